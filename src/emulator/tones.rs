//! The emulator's deterministic "language": words are pure tones.
//!
//! A word is one of [`SYMBOLS`] tones, `500 + 200·k` Hz for `k` in `0..16`, lasting
//! [`TONE_MS`] and followed by [`GAP_MS`] of silence. The recognizer classifies each 20 ms block
//! of a stream with a Goertzel filter per symbol (only for blocks with energy), turns each run of
//! same-symbol blocks into the token `w{k}`, and ends an utterance after [`UTTERANCE_GAP_MS`] of
//! blocks without a tone. At any rate, 20 ms blocks put every symbol exactly on a 50 Hz bin.
//! Positions are sample counts on the stream's own clock (the audio the stream received).

/// Number of symbols (distinct words).
pub const SYMBOLS: u8 = 16;
/// Length of one word's tone.
pub const TONE_MS: u32 = 80;
/// Silence after each word's tone.
pub const GAP_MS: u32 = 40;
/// Silence (no tone) that ends an utterance.
pub const UTTERANCE_GAP_MS: u32 = 300;
/// Peak amplitude of generated tones.
const AMPLITUDE: f64 = 8_000.0;
/// Mean square below which a block is silence (an RMS of 100).
const SILENCE_POWER: f32 = 10_000.0;
/// Fraction of a block's energy that must sit in one symbol's bin for the block to count as
/// that symbol. A block that is a quarter tone and the rest silence scores 0.25.
const TONE_RATIO: f32 = 0.25;
/// Goertzel filters updated side by side, one per symbol, padded to whole SIMD vectors (4 f32
/// lanes on baseline x86-64 and aarch64) so the per-sample update vectorizes.
const LANES: usize = (SYMBOLS as usize).next_multiple_of(4);

/// Frequency of symbol `k` (taken modulo [`SYMBOLS`]).
pub fn symbol_hz(k: u8) -> u32 {
    500 + 200 * u32::from(k % SYMBOLS)
}

/// The transcript word for symbol `k`.
pub fn token(k: u8) -> String {
    format!("w{}", k % SYMBOLS)
}

/// The transcript the emulator gives for `symbols` spoken as one utterance.
pub fn transcript(symbols: &[u8]) -> String {
    symbols
        .iter()
        .map(|&k| token(k))
        .collect::<Vec<_>>()
        .join(" ")
}

/// LINEAR16 audio at `rate_hz` saying `symbols` (each taken modulo [`SYMBOLS`]): per symbol a
/// [`TONE_MS`] tone then [`GAP_MS`] of silence. Follow it with at least [`UTTERANCE_GAP_MS`] of
/// [`silence`] to end the utterance.
pub fn tone_words(symbols: &[u8], rate_hz: u32) -> Vec<i16> {
    let tone_len = ms_to_samples(TONE_MS, rate_hz);
    let gap_len = ms_to_samples(GAP_MS, rate_hz);
    let mut out = Vec::with_capacity(symbols.len() * (tone_len + gap_len));
    for &k in symbols {
        let step = std::f64::consts::TAU * f64::from(symbol_hz(k)) / f64::from(rate_hz.max(1));
        out.extend((0..tone_len).map(|i| (AMPLITUDE * (step * i as f64).sin()) as i16));
        out.extend(std::iter::repeat_n(0, gap_len));
    }
    out
}

/// `ms` of silence at `rate_hz`.
pub fn silence(ms: u32, rate_hz: u32) -> Vec<i16> {
    vec![0; ms_to_samples(ms, rate_hz)]
}

fn ms_to_samples(ms: u32, rate_hz: u32) -> usize {
    (u64::from(ms) * u64::from(rate_hz) / 1_000) as usize
}

/// What the recognizer noticed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A word ended: the utterance so far, ending at `end_sample`.
    Word { symbols: Vec<u8>, end_sample: u64 },
    /// An utterance ended (or the stream did): all its words; `end_sample` is the end of the
    /// last word.
    Utterance { symbols: Vec<u8>, end_sample: u64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Block {
    Quiet,
    Tone(u8),
}

/// Streaming tone-word recognizer for one stream.
pub struct Recognizer {
    block_len: usize,
    filters: Filters,
    /// The start of a block split across pushes.
    pending: Vec<i16>,
    /// Samples consumed in whole blocks.
    position: u64,
    run: Option<u8>,
    utterance: Vec<u8>,
    last_word_end: u64,
    quiet_blocks: u32,
    gap_blocks: u32,
}

impl Recognizer {
    pub fn new(rate_hz: u32) -> Recognizer {
        let block_len = (rate_hz / 50).max(1) as usize;
        Recognizer {
            block_len,
            filters: Filters::new(rate_hz),
            pending: Vec::with_capacity(block_len),
            position: 0,
            run: None,
            utterance: Vec::new(),
            last_word_end: 0,
            quiet_blocks: 0,
            gap_blocks: UTTERANCE_GAP_MS.div_ceil(20),
        }
    }

    /// Feed samples; events are appended to `out`.
    pub fn push(&mut self, mut samples: &[i16], out: &mut Vec<Event>) {
        while !samples.is_empty() {
            if self.pending.is_empty() && samples.len() >= self.block_len {
                // Whole blocks are classified in place, without a copy.
                let (block, rest) = samples.split_at(self.block_len);
                let block = self.filters.classify(block);
                self.step(block, out);
                self.position += self.block_len as u64;
                samples = rest;
                continue;
            }
            let take = (self.block_len - self.pending.len()).min(samples.len());
            self.pending.extend_from_slice(&samples[..take]);
            samples = &samples[take..];
            if self.pending.len() == self.block_len {
                let block = self.filters.classify(&self.pending);
                self.pending.clear();
                self.step(block, out);
                self.position += self.block_len as u64;
            }
        }
    }

    /// End of stream: close the word in progress and the utterance.
    pub fn flush(&mut self, out: &mut Vec<Event>) {
        if !self.pending.is_empty() {
            let block = self.filters.classify(&self.pending);
            let len = self.pending.len() as u64;
            self.pending.clear();
            self.step(block, out);
            self.position += len;
        }
        self.end_word(self.position, out);
        self.end_utterance(out);
    }

    fn step(&mut self, block: Block, out: &mut Vec<Event>) {
        match block {
            Block::Tone(k) if self.run == Some(k) => {}
            Block::Tone(k) => {
                self.end_word(self.position, out);
                self.run = Some(k);
                self.quiet_blocks = 0;
            }
            Block::Quiet => {
                if self.end_word(self.position, out) {
                    self.quiet_blocks = 0;
                }
                self.quiet_blocks += 1;
                if self.quiet_blocks >= self.gap_blocks {
                    self.end_utterance(out);
                }
            }
        }
    }

    fn end_word(&mut self, end_sample: u64, out: &mut Vec<Event>) -> bool {
        let Some(k) = self.run.take() else {
            return false;
        };
        self.utterance.push(k);
        self.last_word_end = end_sample;
        out.push(Event::Word {
            symbols: self.utterance.clone(),
            end_sample,
        });
        true
    }

    fn end_utterance(&mut self, out: &mut Vec<Event>) {
        if !self.utterance.is_empty() {
            let symbols = std::mem::take(&mut self.utterance);
            out.push(Event::Utterance {
                symbols,
                end_sample: self.last_word_end,
            });
        }
    }
}

/// Goertzel filters for every symbol, evaluated together over one block.
struct Filters {
    /// `2·cos(ω)` per symbol; padding lanes are 0 and never read.
    coeffs: [f32; LANES],
}

impl Filters {
    fn new(rate_hz: u32) -> Filters {
        let mut coeffs = [0.0; LANES];
        for (k, coeff) in coeffs.iter_mut().enumerate().take(usize::from(SYMBOLS)) {
            let omega = std::f64::consts::TAU * f64::from(symbol_hz(k as u8)) / f64::from(rate_hz);
            *coeff = (2.0 * omega.cos()) as f32;
        }
        Filters { coeffs }
    }

    fn classify(&self, block: &[i16]) -> Block {
        // Exact and vectorizable; most blocks of real audio stop here or after one more pass.
        let energy: i64 = block
            .iter()
            .map(|&s| i64::from(i32::from(s) * i32::from(s)))
            .sum();
        let n = block.len() as f32;
        let energy = energy as f32;
        if energy < SILENCE_POWER * n {
            return Block::Quiet;
        }
        // One pass over the samples updates all filters: independent lanes instead of one long
        // dependency chain per filter. f32 is ample for a 20 ms block (at most 960 samples).
        let (mut s1, mut s2) = ([0.0f32; LANES], [0.0f32; LANES]);
        for &x in block {
            let x = f32::from(x);
            for lane in 0..LANES {
                let s0 = x + self.coeffs[lane] * s1[lane] - s2[lane];
                s2[lane] = s1[lane];
                s1[lane] = s0;
            }
        }
        let mut best = (0u8, 0.0f32);
        for k in 0..usize::from(SYMBOLS) {
            let power = s1[k] * s1[k] + s2[k] * s2[k] - self.coeffs[k] * s1[k] * s2[k];
            if power > best.1 {
                best = (k as u8, power);
            }
        }
        // A pure on-bin tone filling the block has power = energy * n / 2.
        if best.1 >= TONE_RATIO * energy * n / 2.0 {
            Block::Tone(best.0)
        } else {
            Block::Quiet
        }
    }
}
