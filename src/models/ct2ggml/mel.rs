//! The mel filterbank whisper.cpp reads from the model file.
//!
//! OpenAI's Whisper uses `librosa.filters.mel(sr=16000, n_fft=400, n_mels=N)`
//! with librosa's defaults: the Slaney mel scale (linear below 1 kHz,
//! logarithmic above), triangles spanning 0 Hz .. sr/2, and "slaney" area
//! normalisation. CTranslate2 models do not carry the filterbank, so it is
//! recomputed here. The arithmetic mirrors librosa step by step (f64
//! throughout, rounding to f32 at the same two points), which reproduces
//! OpenAI's bundled `whisper/assets/mel_filters.npz` (80 and 128 bins) bit
//! for bit, so converted models get exactly the front end Whisper was
//! trained with.

/// Whisper's audio sample rate.
pub const SAMPLE_RATE: u32 = 16_000;
/// Whisper's STFT size; the filterbank has `N_FFT / 2 + 1` columns.
pub const N_FFT: usize = 400;

// Slaney mel scale constants (librosa `hz_to_mel(..., htk=False)`).
const F_SP: f64 = 200.0 / 3.0; // Hz per mel in the linear region
const MIN_LOG_HZ: f64 = 1000.0; // where the log region starts
const MIN_LOG_MEL: f64 = MIN_LOG_HZ / F_SP; // = 15 mel

fn log_step() -> f64 {
    6.4f64.ln() / 27.0
}

/// Slaney-scale mel value of a frequency in Hz.
pub fn hz_to_mel(hz: f64) -> f64 {
    if hz >= MIN_LOG_HZ {
        MIN_LOG_MEL + (hz / MIN_LOG_HZ).ln() / log_step()
    } else {
        hz / F_SP
    }
}

/// Inverse of [`hz_to_mel`].
pub fn mel_to_hz(mel: f64) -> f64 {
    if mel >= MIN_LOG_MEL {
        MIN_LOG_HZ * (log_step() * (mel - MIN_LOG_MEL)).exp()
    } else {
        F_SP * mel
    }
}

/// Row-major `n_mels x (n_fft / 2 + 1)` filterbank, as whisper.cpp expects it
/// (row = mel bin, column = FFT bin).
pub fn mel_filterbank(sample_rate: u32, n_fft: usize, n_mels: usize) -> Vec<f32> {
    let sr = f64::from(sample_rate);
    let n_freqs = n_fft / 2 + 1;

    // FFT bin centre frequencies, computed like numpy's rfftfreq.
    let bin_hz = 1.0 / (n_fft as f64 * (1.0 / sr));
    let fft_freqs: Vec<f64> = (0..n_freqs).map(|k| k as f64 * bin_hz).collect();

    // n_mels + 2 band edges equally spaced in mel between 0 Hz and Nyquist,
    // computed like numpy's linspace (i * step, exact end point).
    let n_edges = n_mels + 2;
    let max_mel = hz_to_mel(sr / 2.0);
    let step = max_mel / (n_edges - 1) as f64;
    let edges_hz: Vec<f64> = (0..n_edges)
        .map(|i| {
            if i == n_edges - 1 {
                max_mel
            } else {
                i as f64 * step
            }
        })
        .map(mel_to_hz)
        .collect();

    let mut weights = Vec::with_capacity(n_mels * n_freqs);
    for m in 0..n_mels {
        let (lo, mid, hi) = (edges_hz[m], edges_hz[m + 1], edges_hz[m + 2]);
        // Slaney normalisation scales each triangle to unit area in Hz.
        let enorm = 2.0 / (hi - lo);
        for &f in &fft_freqs {
            // Written as librosa does (`-(lo - f)`, then numpy's
            // `maximum(0, x)`, which keeps x when x == 0) so that even the
            // sign of zero entries matches OpenAI's mel_filters.npz.
            let rising = -(lo - f) / (mid - lo);
            let falling = (hi - f) / (hi - mid);
            let v = rising.min(falling);
            let v = if v < 0.0 { 0.0 } else { v };
            // librosa stores the triangle in its f32 output array before
            // multiplying by the norm, hence the intermediate rounding.
            weights.push((f64::from(v as f32) * enorm) as f32);
        }
    }
    weights
}

#[cfg(test)]
mod tests {
    use super::*;

    const N_FREQS: usize = N_FFT / 2 + 1;

    fn whisper_80() -> Vec<f32> {
        mel_filterbank(SAMPLE_RATE, N_FFT, 80)
    }

    fn row(w: &[f32], m: usize) -> &[f32] {
        &w[m * N_FREQS..(m + 1) * N_FREQS]
    }

    #[test]
    fn shape_is_80_by_201() {
        assert_eq!(N_FREQS, 201);
        assert_eq!(whisper_80().len(), 80 * 201);
    }

    #[test]
    fn mel_scale_matches_slaney() {
        // Linear part: 200/3 Hz per mel; 1 kHz is exactly 15 mel.
        assert!((hz_to_mel(1000.0) - 15.0).abs() < 1e-12);
        assert!((hz_to_mel(200.0) - 3.0).abs() < 1e-12);
        // Log part: 6.4x the frequency is 27 mel more.
        assert!((hz_to_mel(6400.0) - 42.0).abs() < 1e-12);
        // Nyquist: 15 + 27 * ln 8 / ln 6.4 = 45.24564...
        assert!((hz_to_mel(8000.0) - 45.245_640_47).abs() < 1e-8);
        for hz in [0.0, 37.0, 999.0, 1000.0, 4321.0, 8000.0] {
            assert!((mel_to_hz(hz_to_mel(hz)) - hz).abs() < 1e-9);
        }
    }

    #[test]
    fn first_filter_has_a_single_tap() {
        // Edges of filter 0: 0, 45.24564/81 mel = 37.2392 Hz, 74.4784 Hz.
        // Bins are 40 Hz apart, so only bin 1 (40 Hz) is inside, on the
        // falling slope: (74.4784 - 40) / 37.2392 = 0.925866, times the
        // Slaney norm 2 / 74.4784 = 0.0268534 -> 0.0248626.
        let w = whisper_80();
        let r = row(&w, 0);
        assert_eq!(r[0], 0.0);
        assert!((r[1] - 0.024_862_6).abs() < 2e-7, "{}", r[1]);
        assert!(r[2..].iter().all(|v| *v == 0.0));
    }

    #[test]
    fn last_filter_spans_its_band() {
        // Filter 79: edges at mel 79, 80, 81 x 0.558588 = 7408.54, 7698.59,
        // 8000 Hz. Bins 186 (7440 Hz) ..= 199 (7960 Hz) are inside: 14 taps;
        // bin 200 (8000 Hz) sits on the upper edge and gets 0.
        let w = whisper_80();
        let r = row(&w, 79);
        let taps: Vec<usize> = (0..N_FREQS).filter(|k| r[*k] > 0.0).collect();
        assert_eq!(taps, (186..=199).collect::<Vec<_>>());
        // Peak at bin 192 (7680 Hz, just below the 7698.59 Hz centre):
        // (7680 - 7408.54) / 290.05 = 0.935897, x 2 / 591.46 -> 0.0031647.
        let peak = (0..N_FREQS).max_by(|a, b| r[*a].total_cmp(&r[*b])).unwrap();
        assert_eq!(peak, 192);
        assert!((r[192] - 0.003_164_7).abs() < 1e-7, "{}", r[192]);
    }

    #[test]
    fn low_filters_are_narrow_and_high_filters_wide() {
        let w = whisper_80();
        let taps = |m: usize| row(&w, m).iter().filter(|v| **v > 0.0).count();
        // Below 1 kHz, filters are ~37 Hz apart (narrower than a 40 Hz bin),
        // so each triangle covers one or two bins; at the top, ~14 bins.
        assert!((0..26).all(|m| (1..=2).contains(&taps(m))));
        assert!((taps(0)..=taps(79)).contains(&taps(50)));
        assert_eq!(taps(79), 14);
    }

    #[test]
    fn wide_filters_have_unit_area() {
        // Slaney normalisation makes each triangle's area in Hz equal to 1, so
        // a filter sampled finely enough (>= 6 bins, filters 55..80) sums to
        // about 1 / (40 Hz bin spacing) = 0.025. Narrow ones deviate more
        // because of where the bins happen to fall.
        let w = whisper_80();
        for m in 55..80 {
            let sum: f32 = row(&w, m).iter().sum();
            assert!(
                (sum - 0.025).abs() < 0.025 * 0.02,
                "filter {m} sums to {sum}"
            );
        }
    }

    #[test]
    fn peak_bins_follow_filter_centres() {
        let w = whisper_80();
        let step = hz_to_mel(8000.0) / 81.0;
        for m in [5usize, 20, 40, 60, 79] {
            let r = row(&w, m);
            let peak = (0..N_FREQS).max_by(|a, b| r[*a].total_cmp(&r[*b])).unwrap();
            let centre_hz = mel_to_hz((m + 1) as f64 * step);
            // The largest tap is one of the two bins around the centre.
            assert!(
                (peak as f64 * 40.0 - centre_hz).abs() <= 40.0,
                "filter {m}: bin {peak} vs {centre_hz} Hz"
            );
        }
        // Nothing is negative and every filter has at least one tap.
        assert!(w.iter().all(|v| *v >= 0.0));
        assert!((0..80).all(|m| row(&w, m).iter().any(|v| *v > 0.0)));
    }

    #[test]
    fn whisper_128_bin_variant_has_right_shape() {
        // large-v3 uses 128 mel bins with the same recipe.
        let w = mel_filterbank(SAMPLE_RATE, N_FFT, 128);
        assert_eq!(w.len(), 128 * 201);
        assert!(w.iter().all(|v| v.is_finite() && *v >= 0.0));
    }
}
