//! The emulator's deterministic "language": words are pure tones; markers are answered at once.
//!
//! A word is one of [`SYMBOLS`] tones, `500 + 200·k` Hz for `k` in `0..16`, lasting
//! [`TONE_MS`] and followed by [`GAP_MS`] of silence. The recognizer classifies each 20 ms block
//! of a stream with a Goertzel filter per symbol (only for blocks with energy), turns each run of
//! same-symbol blocks into the token `w{k}`, and ends an utterance after [`UTTERANCE_GAP_MS`] of
//! blocks without a tone. At any rate, 20 ms blocks put every symbol exactly on a 50 Hz bin.
//!
//! A marker ([`marker`]) lets a load tester time the whole path: [`MARKER_MS`] of four tones of
//! [`MARKER_TONE_MS`] each, a start tone at [`MARKER_START_HZ`] (no word's frequency) and three
//! digits of 3 bits, high bits first, that carry the id. The first and last digit are symbols
//! `0..8` and the middle one symbols `8..16`, so neighbouring tones always differ. A tone that
//! long covers two whole blocks wherever the blocks fall, and the recognizer wants exactly that:
//! at least two near-pure blocks of each tone, the four tones in a row, at most one mixed block
//! between two of them. Speech does not do that. The recognizer answers as soon as the last
//! digit's second whole block ends: the utterance in progress becomes a final, then the marker
//! becomes a final of its own ([`marker_transcript`]) that ends with that block, 0–24 ms before
//! the marker's last sample. Marker audio never becomes words.
//!
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
/// Fraction of a block's energy in one bin for the block to count towards a marker. A whole
/// block of a pure tone scores about 1, a block shared by two tones about the larger share
/// squared; not one block of the espeak fixture reaches it, at any rate or alignment.
const MARKER_RATIO: f32 = 0.8;
/// Number of distinct marker ids (ids are taken modulo this).
pub const MARKER_IDS: u16 = 512;
/// Length of a marker's audio.
pub const MARKER_MS: u32 = 4 * MARKER_TONE_MS;
/// Length of each of a marker's four tones: three blocks, so two whole blocks fall inside it
/// however the stream's blocks are aligned.
pub const MARKER_TONE_MS: u32 = 60;
/// A marker's start tone: no word's frequency, on a 50 Hz bin, and below 4 kHz (the Nyquist
/// frequency of 8 kHz audio).
pub const MARKER_START_HZ: u32 = 3_700;
/// The filter (and block symbol) of the start tone, after the word symbols.
const START: u8 = SYMBOLS;
/// Most pure blocks one marker tone yields: 3 (three whole blocks, or two and one it nearly
/// fills), plus one to spare.
const MARKER_RUN_MAX: u8 = 4;
/// Goertzel filters updated side by side, one per symbol and one for the start tone, padded to
/// whole SIMD vectors (4 f32 lanes on baseline x86-64 and aarch64) so the per-sample update
/// vectorizes.
const LANES: usize = (SYMBOLS as usize + 1).next_multiple_of(4);

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

/// The tones (filter indices) of marker `id`: the start tone, then three digits of 3 bits.
fn marker_tones(id: u16) -> [u8; 4] {
    let id = id % MARKER_IDS;
    let digit = |shift: u16| (id >> shift & 7) as u8;
    [START, digit(6), 8 + digit(3), digit(0)]
}

/// LINEAR16 audio at `rate_hz` (8000..=48000) for marker `id` (taken modulo [`MARKER_IDS`]):
/// [`MARKER_MS`] long, four tones of at least [`MARKER_TONE_MS`] with no gap. It needs no
/// silence around it.
pub fn marker(id: u16, rate_hz: u32) -> Vec<i16> {
    let mut out = Vec::with_capacity(ms_to_samples(MARKER_MS, rate_hz));
    // One running phase: no click where one tone turns into the next, so the block shared by
    // two tones holds the two tones and little else.
    let mut phase = 0.0f64;
    for (i, tone) in (1..).zip(marker_tones(id)) {
        let step = std::f64::consts::TAU * f64::from(filter_hz(tone)) / f64::from(rate_hz.max(1));
        // Boundaries on the millisecond grid: each tone at least MARKER_TONE_MS long, the
        // whole exactly MARKER_MS.
        let end = ms_to_samples(MARKER_TONE_MS * i, rate_hz);
        while out.len() < end {
            out.push((AMPLITUDE * phase.sin()) as i16);
            phase = (phase + step) % std::f64::consts::TAU;
        }
    }
    out
}

/// The transcript the emulator gives for marker `id`, e.g. "marker 17".
pub fn marker_transcript(id: u16) -> String {
    format!("marker {}", id % MARKER_IDS)
}

/// Parse a transcript back into a marker id (None if it is not exactly a marker transcript).
pub fn parse_marker(transcript: &str) -> Option<u16> {
    let digits = transcript.strip_prefix("marker ")?;
    // Only the form marker_transcript writes: no sign, no leading zero.
    let canonical =
        digits.bytes().all(|b| b.is_ascii_digit()) && (digits == "0" || !digits.starts_with('0'));
    let id: u16 = digits.parse().ok()?;
    (canonical && id < MARKER_IDS).then_some(id)
}

/// Frequency of filter `k`: a word symbol, or the marker's start tone.
fn filter_hz(k: u8) -> u32 {
    if k == START {
        MARKER_START_HZ
    } else {
        symbol_hz(k)
    }
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
    /// A marker was recognized; `end_sample` is the end of the block that settled it.
    Marker { id: u16, end_sample: u64 },
}

/// How one block was classified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Block {
    Quiet,
    /// Filter `k` holds at least [`TONE_RATIO`] of the block's energy; `pure` when it holds at
    /// least [`MARKER_RATIO`].
    Tone {
        k: u8,
        pure: bool,
    },
}

impl Block {
    fn pure(self) -> Option<u8> {
        match self {
            Block::Tone { k, pure: true } => Some(k),
            _ => None,
        }
    }
}

/// A block held back while it may be part of a marker.
#[derive(Debug, Clone, Copy)]
struct Held {
    block: Block,
    start: u64,
}

/// Streaming tone-word and marker recognizer for one stream.
pub struct Recognizer {
    block_len: usize,
    filters: Filters,
    /// The start of a block split across pushes.
    pending: Vec<i16>,
    /// Samples consumed in whole blocks.
    position: u64,
    words: Words,
    /// Blocks from a pure start tone on, kept from the words until they are known to be no
    /// marker (or a marker's, and dropped).
    held: Vec<Held>,
    /// Right after a marker: its last digit, and the position before which blocks may still
    /// hold some of it (up to a block and a fifth, see `read_marker`).
    tail: Option<(u8, u64)>,
}

impl Recognizer {
    pub fn new(rate_hz: u32) -> Recognizer {
        let block_len = (rate_hz / 50).max(1) as usize;
        Recognizer {
            block_len,
            filters: Filters::new(rate_hz),
            pending: Vec::with_capacity(block_len),
            position: 0,
            words: Words {
                run: None,
                utterance: Vec::new(),
                last_word_end: 0,
                quiet_blocks: 0,
                gap_blocks: UTTERANCE_GAP_MS.div_ceil(20),
            },
            held: Vec::new(),
            tail: None,
        }
    }

    /// Feed samples; events are appended to `out`.
    pub fn push(&mut self, mut samples: &[i16], out: &mut Vec<Event>) {
        while !samples.is_empty() {
            if self.pending.is_empty() && samples.len() >= self.block_len {
                // Whole blocks are classified in place, without a copy.
                let (block, rest) = samples.split_at(self.block_len);
                let block = self.filters.classify(block);
                self.step(block, self.block_len, out);
                samples = rest;
                continue;
            }
            let take = (self.block_len - self.pending.len()).min(samples.len());
            self.pending.extend_from_slice(&samples[..take]);
            samples = &samples[take..];
            if self.pending.len() == self.block_len {
                let block = self.filters.classify(&self.pending);
                self.pending.clear();
                self.step(block, self.block_len, out);
            }
        }
    }

    /// End of stream: close the word in progress and the utterance. A marker cut short is
    /// ordinary audio.
    pub fn flush(&mut self, out: &mut Vec<Event>) {
        if !self.pending.is_empty() {
            let block = match self.filters.classify(&self.pending) {
                // A marker is made of whole blocks.
                Block::Tone { k, .. } => Block::Tone { k, pure: false },
                Block::Quiet => Block::Quiet,
            };
            let len = self.pending.len();
            self.pending.clear();
            self.step(block, len, out);
        }
        for held in self.held.drain(..) {
            self.words.step(held.block, held.start, out);
        }
        self.words.end_word(self.position, out);
        self.words.end_utterance(out);
    }

    /// Take the next block, `len` samples from `self.position`.
    fn step(&mut self, block: Block, len: usize, out: &mut Vec<Event>) {
        let start = self.position;
        self.position += len as u64;
        if let Some((last, until)) = self.tail {
            if start < until && matches!(block, Block::Tone { k, .. } if k == last) {
                return;
            }
            self.tail = None;
        }
        if self.held.is_empty() && block.pure() != Some(START) {
            self.words.step(block, start, out);
            return;
        }
        self.held.push(Held { block, start });
        loop {
            match read_marker(&self.held) {
                Marker::Partial => return,
                Marker::Complete { id, last } => {
                    // Results stay in order: the words before the marker first.
                    self.words.end_word(self.held[0].start, out);
                    self.words.end_utterance(out);
                    out.push(Event::Marker {
                        id,
                        end_sample: self.position,
                    });
                    self.held.clear();
                    let block_len = self.block_len as u64;
                    self.tail = Some((last, self.position + block_len + block_len / 5));
                    return;
                }
                Marker::Broken => {
                    // The first held block starts no marker; a later pure start tone may.
                    let next = self.held[1..]
                        .iter()
                        .position(|h| h.block.pure() == Some(START))
                        .map_or(self.held.len(), |i| i + 1);
                    for held in self.held.drain(..next) {
                        self.words.step(held.block, held.start, out);
                    }
                    if self.held.is_empty() {
                        return;
                    }
                }
            }
        }
    }
}

/// What the held blocks say.
enum Marker {
    /// A marker so far.
    Partial,
    /// A whole marker: its id and last digit.
    Complete { id: u16, last: u8 },
    /// Not a marker.
    Broken,
}

/// Read blocks that begin with a pure start tone as a marker.
///
/// A block shared by two tones is pure for the one that fills nearly all of it (89 %, its share
/// squared reaching [`MARKER_RATIO`], give or take the other tone's leakage), so the last
/// digit's second pure block can end a little more than one block before the marker's last
/// sample: at most a fifth of a block more (12 % seen over all ids and alignments).
fn read_marker(held: &[Held]) -> Marker {
    // The tone being counted (0 = the start tone) and its pure blocks so far.
    let mut index = 0;
    let mut tone = START;
    let mut pure_blocks = 0u8;
    // Whether a mixed block followed the tone's pure blocks: the next must be the next tone.
    let mut mixed = false;
    let mut id = 0u16;
    for held in held {
        let pure = held.block.pure();
        if pure == Some(tone) && !mixed {
            pure_blocks += 1;
            if pure_blocks > MARKER_RUN_MAX {
                return Marker::Broken;
            }
            if index == 3 && pure_blocks == 2 {
                return Marker::Complete { id, last: tone };
            }
            continue;
        }
        if pure_blocks < 2 {
            return Marker::Broken;
        }
        // The middle digit is from the upper half of the symbols, the others from the lower.
        let digits = if index == 1 { 8..16 } else { 0..8 };
        match pure {
            Some(k) if digits.contains(&k) => {
                index += 1;
                tone = k;
                pure_blocks = 1;
                mixed = false;
                id = id << 3 | u16::from(k % 8);
            }
            _ if !mixed => mixed = true,
            _ => return Marker::Broken,
        }
    }
    Marker::Partial
}

/// Words and utterances from classified blocks.
struct Words {
    run: Option<u8>,
    utterance: Vec<u8>,
    last_word_end: u64,
    quiet_blocks: u32,
    gap_blocks: u32,
}

impl Words {
    /// Take the block that starts at `start`.
    fn step(&mut self, block: Block, start: u64, out: &mut Vec<Event>) {
        match block {
            Block::Tone { k, .. } if k < SYMBOLS && self.run == Some(k) => {}
            Block::Tone { k, .. } if k < SYMBOLS => {
                self.end_word(start, out);
                self.run = Some(k);
                self.quiet_blocks = 0;
            }
            // A start tone that began no marker is no word either.
            Block::Tone { .. } | Block::Quiet => {
                if self.end_word(start, out) {
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

/// Goertzel filters for every symbol and the start tone, evaluated together over one block.
struct Filters {
    /// `2·cos(ω)` per filter; padding lanes are 0 and never read.
    coeffs: [f32; LANES],
}

impl Filters {
    fn new(rate_hz: u32) -> Filters {
        let mut coeffs = [0.0; LANES];
        for (k, coeff) in (0..=START).zip(&mut coeffs) {
            let omega = std::f64::consts::TAU * f64::from(filter_hz(k)) / f64::from(rate_hz);
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
        for k in 0..=START {
            let i = usize::from(k);
            let power = s1[i] * s1[i] + s2[i] * s2[i] - self.coeffs[i] * s1[i] * s2[i];
            if power > best.1 {
                best = (k, power);
            }
        }
        // A pure on-bin tone filling the block has power = energy * n / 2.
        let full = energy * n / 2.0;
        if best.1 >= TONE_RATIO * full {
            Block::Tone {
                k: best.0,
                pure: best.1 >= MARKER_RATIO * full,
            }
        } else {
            Block::Quiet
        }
    }
}

#[cfg(test)]
mod tests;
