//! Resample: mono frames at the input rate in, frames at the engine's rate out.
//!
//! Consumes [`AudioFrame`]s at the session's input rate and produces frames at the target rate
//! (16 kHz by default), positioned on the session clock at that rate. Input already at the
//! target rate passes through untouched (byte-exact). Otherwise a synchronous FFT resampler
//! (rubato) works on fixed input chunks of about 20 ms; it keeps the part of a chunk not yet
//! processed and its filter delay. `flush` pushes the tail through with silence and trims the
//! output to exactly the resampled length of the input, so no audio is lost or invented.

#[cfg(test)]
mod tests;

use std::convert::Infallible;

use audioadapter_buffers::direct::InterleavedSlice;
use pipeline::metrics::ErrorKind;
use pipeline::processor::StageError;
use pipeline::{AudioFrame, Processor, SessionError};
use rubato::{Fft, FixedSync, Indexing, Resampler as _};

#[derive(Debug, thiserror::Error)]
pub enum ResampleError {
    #[error("cannot resample {from_hz} Hz to {to_hz} Hz: {reason}")]
    Unsupported {
        from_hz: u32,
        to_hz: u32,
        reason: String,
    },
}

impl StageError for ResampleError {
    fn kind(&self) -> ErrorKind {
        ErrorKind::Decode
    }

    fn to_session_error(&self) -> SessionError {
        SessionError {
            code: "unsupported_audio",
            message: self.to_string(),
            close_code: pipeline::session::close_code::UNSUPPORTED_DATA,
        }
    }
}

pub struct Resample {
    to_hz: u32,
    converter: Option<Converter>,
    /// Next output position on the session clock (samples at `to_hz`).
    position: u64,
}

struct Converter {
    resampler: Fft<f32>,
    chunk: usize,
    pending: Vec<f32>,
    out: Vec<f32>,
    /// Output samples still to discard: the resampler's delay, so output aligns with input.
    skip: usize,
    /// Input samples taken and output samples emitted since the last reset.
    taken: u64,
    emitted: u64,
    ratio: f64,
}

impl Resample {
    /// # Errors
    /// When rubato cannot build a resampler for the pair of rates.
    pub fn new(from_hz: u32, to_hz: u32) -> Result<Resample, ResampleError> {
        let converter = if from_hz == to_hz {
            None
        } else {
            let chunk = (from_hz / 50) as usize;
            let resampler =
                Fft::<f32>::new(from_hz as usize, to_hz as usize, chunk, 1, FixedSync::Both)
                    .map_err(|e| ResampleError::Unsupported {
                        from_hz,
                        to_hz,
                        reason: e.to_string(),
                    })?;
            let chunk = resampler.input_frames_next();
            let skip = resampler.output_delay();
            let out = vec![0.0; resampler.output_frames_max()];
            Some(Converter {
                resampler,
                chunk,
                pending: Vec::with_capacity(chunk * 2),
                out,
                skip,
                taken: 0,
                emitted: 0,
                ratio: f64::from(to_hz) / f64::from(from_hz),
            })
        };
        Ok(Resample {
            to_hz,
            converter,
            position: 0,
        })
    }

    /// Whether frames pass through unchanged.
    pub fn is_passthrough(&self) -> bool {
        self.converter.is_none()
    }
}

impl Converter {
    /// Run every whole chunk in `pending` (or, with `partial`, the remainder padded with
    /// silence) and append the output, minus the delay still to skip, to `samples`.
    fn run(&mut self, samples: &mut Vec<i16>, partial: bool) {
        let mut offset = 0;
        while self.pending.len() - offset >= self.chunk || (partial && offset < self.pending.len())
        {
            let available = (self.pending.len() - offset).min(self.chunk);
            let input =
                InterleavedSlice::new(&self.pending[offset..], 1, available).expect("sized");
            let frames_out = self.out.len();
            let mut output =
                InterleavedSlice::new_mut(&mut self.out, 1, frames_out).expect("sized");
            let indexing = (available < self.chunk).then(|| Indexing::new().partial_len(available));
            let (_, produced) = self
                .resampler
                .process_into_buffer(&input, &mut output, indexing.as_ref())
                .expect("buffers sized from the resampler's own limits");
            offset += available;
            self.taken += available as u64;
            let skip = self.skip.min(produced);
            self.skip -= skip;
            samples.extend(self.out[skip..produced].iter().map(|&s| to_i16(s)));
        }
        self.pending.drain(..offset);
    }
}

fn to_i16(sample: f32) -> i16 {
    (sample * 32_768.0).clamp(-32_768.0, 32_767.0) as i16
}

impl Processor for Resample {
    type In = AudioFrame;
    type Out = AudioFrame;
    type Error = Infallible;

    fn process(&mut self, frame: AudioFrame, out: &mut Vec<AudioFrame>) -> Result<(), Infallible> {
        let Some(converter) = self.converter.as_mut() else {
            // Same rate: the frame is already on the target clock.
            self.position = frame.end_sample();
            out.push(frame);
            return Ok(());
        };
        converter
            .pending
            .extend(frame.samples.iter().map(|&s| f32::from(s) / 32_768.0));
        let mut samples =
            Vec::with_capacity((frame.samples.len() as f64 * converter.ratio) as usize + 16);
        converter.run(&mut samples, false);
        converter.emitted += samples.len() as u64;
        if !samples.is_empty() {
            let frame = AudioFrame {
                samples,
                sample_rate_hz: self.to_hz,
                start_sample: self.position,
                speech: frame.speech,
            };
            self.position = frame.end_sample();
            out.push(frame);
        }
        Ok(())
    }

    fn flush(&mut self, out: &mut Vec<AudioFrame>) {
        let Some(converter) = self.converter.as_mut() else {
            return;
        };
        let expected = (converter.taken + converter.pending.len() as u64) as f64 * converter.ratio;
        let expected = expected.round() as u64;
        let mut samples = Vec::new();
        converter.run(&mut samples, true);
        // Feed silence until the delayed tail of the real input has come out.
        while converter.emitted + (samples.len() as u64) < expected {
            converter.pending.resize(converter.chunk, 0.0);
            converter.run(&mut samples, false);
        }
        samples.truncate((expected - converter.emitted) as usize);
        converter.resampler.reset();
        converter.skip = converter.resampler.output_delay();
        converter.pending.clear();
        converter.taken = 0;
        converter.emitted = 0;
        if !samples.is_empty() {
            let frame = AudioFrame {
                samples,
                sample_rate_hz: self.to_hz,
                start_sample: self.position,
                speech: true,
            };
            self.position = frame.end_sample();
            out.push(frame);
        }
    }
}
