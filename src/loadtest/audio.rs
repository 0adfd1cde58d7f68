//! The audio every load-test client loops: real speech cut into pieces, a latency marker after
//! each piece, encoded once up front so clients only copy bytes.
//!
//! A segment is one speech piece (about `marker_interval − MARKER_MS` long, cut where the speech
//! is loud so the marker falls inside the VAD's hangover, not in a pause the gate would hold)
//! followed by one marker. Everything is whole frames, so at 16 kHz every marker starts on a
//! frame boundary of the stream.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};
use base64::Engine as _;
use bytes::Bytes;
use pipeline::Encoding;

use crate::client::Encoder;
use crate::emulator::tones;

/// What espeak-ng says when no speech file is given: ordinary sentences with ordinary pauses.
const TEXT: &str = "Please send the report to the main office before Friday. \
    We will meet at nine thirty tomorrow morning to go over the numbers. \
    The train to the city leaves every twenty minutes from the north platform. \
    Could you call the support team and ask them about the new schedule? \
    Thank you for waiting; your order has been shipped and should arrive next week.";

/// One frame, ready to send in either form.
#[derive(Clone)]
pub struct Frame {
    pub binary: Bytes,
    pub base64: std::sync::Arc<str>,
}

pub struct Clip {
    pub frame_ms: u32,
    pub rate_hz: u32,
    pub samples_per_frame: usize,
    /// Encoded speech; segment `i` is `speech[pieces[i].clone()]`.
    pub speech: Vec<Frame>,
    pub pieces: Vec<std::ops::Range<usize>>,
    /// Encoded markers by id, `MARKER_IDS` of them.
    pub markers: Vec<Vec<Frame>>,
    pub speech_secs: f64,
}

pub struct ClipSpec<'a> {
    pub speech: Option<&'a Path>,
    pub encoding: Encoding,
    pub rate_hz: u32,
    pub frame_ms: u32,
    pub marker_interval_ms: u32,
}

impl Clip {
    /// # Errors
    /// When espeak-ng or sox are missing or fail, or the encoding cannot carry the rate.
    pub fn build(spec: &ClipSpec<'_>) -> anyhow::Result<Clip> {
        let samples = speech(spec.speech, spec.rate_hz)?;
        let mut encoder = client_encoder(spec)?;
        let samples_per_frame = encoder.frame_samples(spec.frame_ms);
        let frame_ms = (samples_per_frame as u64 * 1000 / u64::from(spec.rate_hz)) as u32;
        if spec.marker_interval_ms < tones::MARKER_MS + 200 {
            bail!(
                "--marker-interval-ms must leave at least 200 ms of speech around each {} ms marker",
                tones::MARKER_MS
            );
        }
        let frames: Vec<&[i16]> = samples.chunks_exact(samples_per_frame).collect();
        let pieces = cut(&frames, spec.marker_interval_ms, tones::MARKER_MS, frame_ms);
        if pieces.is_empty() {
            bail!("the speech is shorter than one marker interval");
        }
        let encode = |encoder: &mut Encoder, chunk: &[i16]| -> anyhow::Result<Frame> {
            let bytes = encoder.encode(chunk)?;
            Ok(Frame {
                base64: base64::engine::general_purpose::STANDARD
                    .encode(&bytes)
                    .into(),
                binary: Bytes::from(bytes),
            })
        };
        let speech = frames
            .iter()
            .map(|chunk| encode(&mut encoder, chunk))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let markers = (0..tones::MARKER_IDS)
            .map(|id| {
                // A fresh encoder per marker: with Opus a marker then follows speech the
                // decoder did not hear it after, a small glitch a real network also makes.
                let mut encoder = client_encoder(spec)?;
                let audio = tones::marker(id, spec.rate_hz);
                audio
                    .chunks(samples_per_frame)
                    .map(|chunk| {
                        let mut frame = chunk.to_vec();
                        frame.resize(samples_per_frame, 0);
                        encode(&mut encoder, &frame)
                    })
                    .collect()
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Clip {
            frame_ms,
            rate_hz: spec.rate_hz,
            samples_per_frame,
            speech,
            pieces,
            markers,
            speech_secs: samples.len() as f64 / f64::from(spec.rate_hz),
        })
    }
}

/// The client's encoder. Opus at its VoIP defaults smears the marker tones until the emulator
/// no longer recognizes them (23 of 40 lost in a trial); a music-grade bitrate keeps them pure,
/// which is also what a client sending to a recognizer should use.
fn client_encoder(spec: &ClipSpec<'_>) -> anyhow::Result<Encoder> {
    let mut encoder = Encoder::new(spec.encoding, spec.rate_hz, 1)?;
    if let Encoder::Opus { encoder, .. } = &mut encoder {
        encoder.set_bitrate(opus::Bitrate::Bits(64_000))?;
        encoder.set_signal(opus::Signal::Music)?;
    }
    Ok(encoder)
}

/// Cut whole frames into pieces of about `interval − marker` each, ending each piece on the
/// loudest nearby frame so the marker after it directly follows speech.
fn cut(
    frames: &[&[i16]],
    interval_ms: u32,
    marker_ms: u32,
    frame_ms: u32,
) -> Vec<std::ops::Range<usize>> {
    let target = ((interval_ms - marker_ms) / frame_ms) as usize;
    let slack = (target / 4).max(1);
    let energy = |f: &[i16]| f.iter().map(|&s| i64::from(s) * i64::from(s)).sum::<i64>();
    let mut pieces = Vec::new();
    let mut start = 0;
    while start + target + slack <= frames.len() {
        let best = (target - slack..=target + slack)
            .max_by_key(|&len| energy(frames[start + len - 1]))
            .unwrap_or(target);
        pieces.push(start..start + best);
        start += best;
    }
    pieces
}

/// The speech as mono 16-bit samples at `rate_hz`: the given file or espeak-ng's voice,
/// resampled by sox.
fn speech(path: Option<&Path>, rate_hz: u32) -> anyhow::Result<Vec<i16>> {
    let dir = std::env::temp_dir();
    let tag = format!("voxflow-loadtest-{}", std::process::id());
    let source: PathBuf = match path {
        Some(path) => path.to_path_buf(),
        None => {
            let out = dir.join(format!("{tag}-espeak.wav"));
            let status = Command::new("espeak-ng")
                .arg("-w")
                .arg(&out)
                .arg(TEXT)
                .status()
                .context("cannot run espeak-ng (install it, e.g. scripts/setup --test), or pass --speech FILE.wav")?;
            if !status.success() {
                bail!("espeak-ng failed: {status}");
            }
            out
        }
    };
    let resampled = dir.join(format!("{tag}-{rate_hz}.wav"));
    let status = Command::new("sox")
        .arg(&source)
        .args([
            "-r",
            &rate_hz.to_string(),
            "-c",
            "1",
            "-b",
            "16",
            "-e",
            "signed-integer",
        ])
        .arg(&resampled)
        .status()
        .context("cannot run sox (install it, e.g. scripts/setup --test)")?;
    if !status.success() {
        bail!("sox could not convert {}: {status}", source.display());
    }
    let (samples, _, _) = crate::client::read_wav(&resampled)?;
    let _ = std::fs::remove_file(&resampled);
    if path.is_none() {
        let _ = std::fs::remove_file(&source);
    }
    Ok(samples)
}
