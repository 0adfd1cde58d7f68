//! Convert OpenAI Whisper weights from CTranslate2 format (as shipped for
//! faster-whisper) into the ggml `.bin` format that whisper.cpp, and so the
//! `whisper-rs` crate, loads.
//!
//! What differs between the two formats, and how it is bridged:
//!
//! * Names: CTranslate2 uses `encoder/layer_N/self_attention/linear_0/...`
//!   scopes, whisper.cpp looks tensors up by OpenAI's PyTorch names
//!   (`encoder.blocks.N.attn.query.weight`, ...). See [`convert_ct2_dir`]
//!   for the mapping.
//! * Fused projections: CTranslate2 stores self-attention q|k|v as one
//!   `[3d, d]` matrix and cross-attention k|v as one `[2d, d]` matrix; they
//!   are split by rows.
//! * Key bias: Whisper's key projections have no bias and whisper.cpp has no
//!   tensor for one, but the fused CTranslate2 bias has a (zero) slot for it.
//!   It is dropped. That is exact even if it were not zero: a key bias adds
//!   `q . b_k` to every logit of a query, a constant that softmax cancels.
//! * Types: whisper.cpp checks each tensor's type against the one it
//!   allocates: f16 for matrices (ftype 1), f32 for 1-D tensors, conv biases
//!   and positional embeddings. Sources in f32/f16/bf16, or int8/int16 with
//!   CTranslate2's `_scale` companions, are converted to that.
//! * Conv biases: whisper.cpp wants them as `[d, 1]` (ggml `[1, d]`).
//! * Extras the ggml file needs but CTranslate2 lacks: the mel filterbank
//!   (recomputed, see [`mel`]) and the vocabulary as raw bytes (see [`vocab`]).
//!
//! The converter indexes `model.bin` and then reads one tensor at a time, so
//! peak memory is about twice the largest tensor (the token embedding), well
//! under twice the model size.

mod ct2;
mod ggml;
pub mod mel;
pub mod vocab;

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use half::f16;

use ct2::Ct2Model;
use ggml::{GgmlWriter, TensorData};

/// Why a conversion failed.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("malformed CTranslate2 model: {0}")]
    Format(String),
    #[error("unsupported model: {0}")]
    Unsupported(String),
    #[error("model.bin has no variable {0}")]
    MissingVariable(String),
    #[error("{name} has shape {found:?}, expected {expected:?}")]
    Shape {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("vocabulary: {0}")]
    Vocabulary(String),
}

impl ConvertError {
    pub(crate) fn io(path: &Path, source: io::Error) -> Self {
        Self::Io {
            path: path.to_owned(),
            source,
        }
    }
}

/// The model dimensions stored in the ggml header, in whisper.cpp's order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WhisperHparams {
    pub n_vocab: i32,
    pub n_audio_ctx: i32,
    pub n_audio_state: i32,
    pub n_audio_head: i32,
    pub n_audio_layer: i32,
    pub n_text_ctx: i32,
    pub n_text_state: i32,
    pub n_text_head: i32,
    pub n_text_layer: i32,
    pub n_mels: i32,
    pub ftype: i32,
}

/// What [`convert_ct2_dir`] found and wrote.
#[derive(Debug, Clone)]
pub struct ConvertSummary {
    pub hparams: WhisperHparams,
    /// CTranslate2 `model.bin` format version and WhisperSpec revision.
    pub source_binary_version: u32,
    pub source_spec_revision: u32,
    /// Element type of the stored CTranslate2 tensors (rank >= 1), by count.
    pub source_dtypes: BTreeMap<&'static str, usize>,
    pub tensors_written: usize,
    /// Plain BPE tokens written; whisper.cpp names the special tokens itself.
    pub vocab_tokens_written: usize,
    pub bytes_written: u64,
    /// Largest |value| in the dropped key-bias slots (0 for real Whisper
    /// checkpoints; harmless otherwise, see the module docs).
    pub max_dropped_key_bias: f32,
}

/// Convert the CTranslate2 Whisper model in `ct2_dir` (`model.bin` plus
/// `vocabulary.txt` or `vocabulary.json`) to a ggml file at `out_file`.
///
/// Name mapping (CTranslate2 -> whisper.cpp), per layer N:
///
/// | CTranslate2                                  | whisper.cpp                                  |
/// |----------------------------------------------|----------------------------------------------|
/// | `encoder/conv{1,2}/{weight,bias}`            | `encoder.conv{1,2}.{weight,bias}`            |
/// | `encoder/position_encodings/encodings`       | `encoder.positional_embedding`               |
/// | `{enc,dec}oder/layer_N/self_attention/layer_norm/{gamma,beta}` | `...blocks.N.attn_ln.{weight,bias}` |
/// | `.../self_attention/linear_0` (q\|k\|v)      | `...blocks.N.attn.{query,key,value}`         |
/// | `.../self_attention/linear_1`                | `...blocks.N.attn.out`                       |
/// | `decoder/layer_N/attention/layer_norm`       | `decoder.blocks.N.cross_attn_ln`             |
/// | `decoder/layer_N/attention/linear_0`         | `decoder.blocks.N.cross_attn.query`          |
/// | `decoder/layer_N/attention/linear_1` (k\|v)   | `decoder.blocks.N.cross_attn.{key,value}`    |
/// | `decoder/layer_N/attention/linear_2`         | `decoder.blocks.N.cross_attn.out`            |
/// | `.../ffn/layer_norm`, `ffn/linear_0`, `ffn/linear_1` | `...mlp_ln`, `mlp.0`, `mlp.2`        |
/// | `encoder/layer_norm`                         | `encoder.ln_post`                            |
/// | `decoder/embeddings/weight`                  | `decoder.token_embedding.weight`             |
/// | `decoder/position_encodings/encodings`       | `decoder.positional_embedding`               |
/// | `decoder/layer_norm`                         | `decoder.ln`                                 |
///
/// The file is written next to `out_file` under a temporary name and renamed
/// into place at the end, so a failed run never leaves a truncated model where
/// a loader would pick it up.
pub fn convert_ct2_dir(ct2_dir: &Path, out_file: &Path) -> Result<ConvertSummary, ConvertError> {
    let mut model = Ct2Model::open(&ct2_dir.join("model.bin"))?;
    if model.spec_name != "WhisperSpec" {
        return Err(ConvertError::Unsupported(format!(
            "CTranslate2 spec {:?}, expected \"WhisperSpec\"",
            model.spec_name
        )));
    }
    let hparams = read_hparams(&mut model)?;

    let mut source_dtypes = BTreeMap::new();
    for (_, var) in model.variables().filter(|(_, v)| !v.shape.is_empty()) {
        *source_dtypes.entry(var.dtype.name()).or_insert(0) += 1;
    }

    let vocab = {
        let tokens = vocab::load_ct2_vocabulary(ct2_dir)?;
        vocab::ggml_vocabulary(&tokens, dim(hparams.n_vocab))?
    };
    let filters = mel::mel_filterbank(mel::SAMPLE_RATE, mel::N_FFT, dim(hparams.n_mels));

    let partial = partial_path(out_file);
    let stats =
        match write_ggml(&mut model, &partial, &hparams, &filters, &vocab).and_then(|stats| {
            fs::rename(&partial, out_file)
                .map(|()| stats)
                .map_err(|e| ConvertError::io(out_file, e))
        }) {
            Ok(stats) => stats,
            Err(e) => {
                // Best effort: the original error is the one worth reporting.
                let _ = fs::remove_file(&partial);
                return Err(e);
            }
        };

    Ok(ConvertSummary {
        hparams,
        source_binary_version: model.binary_version,
        source_spec_revision: model.spec_revision,
        source_dtypes,
        tensors_written: stats.tensors_written,
        vocab_tokens_written: vocab.len(),
        bytes_written: stats.bytes_written,
        max_dropped_key_bias: stats.max_dropped_key_bias,
    })
}

struct WriteStats {
    tensors_written: usize,
    bytes_written: u64,
    max_dropped_key_bias: f32,
}

fn write_ggml(
    model: &mut Ct2Model,
    path: &Path,
    hparams: &WhisperHparams,
    filters: &[f32],
    vocab: &[Vec<u8>],
) -> Result<WriteStats, ConvertError> {
    let file = File::create(path).map_err(|e| ConvertError::io(path, e))?;
    let mut conv = Converter {
        model,
        out: GgmlWriter::new(BufWriter::with_capacity(1 << 20, file)),
        out_path: path,
        tensors_written: 0,
        max_dropped_key_bias: 0.0,
    };
    conv.write_all(hparams, filters, vocab)?;
    let stats = WriteStats {
        tensors_written: conv.tensors_written,
        bytes_written: conv.out.bytes_written(),
        max_dropped_key_bias: conv.max_dropped_key_bias,
    };
    let file = conv
        .out
        .into_inner()
        .into_inner()
        .map_err(|e| ConvertError::io(path, e.into_error()))?;
    // Make the data durable before the rename publishes it.
    file.sync_all().map_err(|e| ConvertError::io(path, e))?;
    Ok(stats)
}

fn partial_path(out_file: &Path) -> PathBuf {
    let mut name = out_file
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".partial");
    out_file.with_file_name(name)
}

/// Header values are i32 in ggml; they were validated as positive.
fn dim(v: i32) -> usize {
    usize::try_from(v).unwrap_or(0)
}

fn to_i32(name: &str, v: usize) -> Result<i32, ConvertError> {
    i32::try_from(v).map_err(|_| ConvertError::Format(format!("{name} = {v} does not fit in i32")))
}

fn shape_of<const N: usize>(model: &Ct2Model, name: &str) -> Result<[usize; N], ConvertError> {
    let shape = &model.require(name)?.shape;
    <[usize; N]>::try_from(shape.as_slice())
        .map_err(|_| ConvertError::Format(format!("{name} has rank {}, expected {N}", shape.len())))
}

fn count_layers(model: &Ct2Model, side: &str) -> usize {
    (0..)
        .take_while(|i| {
            model
                .get(&format!("{side}/layer_{i}/ffn/linear_0/weight"))
                .is_some()
        })
        .count()
}

/// Derive the ggml hparams from tensor shapes, as whisper.cpp will check the
/// tensors against them.
fn read_hparams(model: &mut Ct2Model) -> Result<WhisperHparams, ConvertError> {
    let [n_vocab, n_text_state] = shape_of(model, "decoder/embeddings/weight")?;
    let [n_text_ctx, dec_pos_state] = shape_of(model, "decoder/position_encodings/encodings")?;
    let [n_audio_ctx, n_audio_state] = shape_of(model, "encoder/position_encodings/encodings")?;
    let [conv_out, n_mels, kernel] = shape_of(model, "encoder/conv1/weight")?;
    let n_audio_layer = count_layers(model, "encoder");
    let n_text_layer = count_layers(model, "decoder");

    // whisper.cpp assumes one model width for encoder and decoder.
    if n_text_state != n_audio_state
        || dec_pos_state != n_text_state
        || conv_out != n_audio_state
        || kernel != 3
    {
        return Err(ConvertError::Unsupported(format!(
            "inconsistent widths: text {n_text_state}, audio {n_audio_state}, decoder positions {dec_pos_state}, \
             conv1 {conv_out}x{n_mels}x{kernel}"
        )));
    }
    if n_audio_layer == 0 || n_text_layer == 0 {
        return Err(ConvertError::Unsupported(
            "no encoder/decoder layers found (low-rank \"lite\" Whisper variants are not supported)".into(),
        ));
    }

    // Whisper's head size is always 64; used only if the (int16) head count
    // scalar is absent.
    let mut heads = |side: &str, state: usize| -> Result<usize, ConvertError> {
        let n = model
            .read_int_scalar(&format!("{side}/num_heads"))?
            .map_or(Ok(state / 64), usize::try_from);
        match n {
            Ok(n) if n > 0 && state.is_multiple_of(n) => Ok(n),
            _ => Err(ConvertError::Format(format!(
                "{side}/num_heads {n:?} does not divide width {state}"
            ))),
        }
    };
    let n_audio_head = heads("encoder", n_audio_state)?;
    let n_text_head = heads("decoder", n_text_state)?;

    Ok(WhisperHparams {
        n_vocab: to_i32("n_vocab", n_vocab)?,
        n_audio_ctx: to_i32("n_audio_ctx", n_audio_ctx)?,
        n_audio_state: to_i32("n_audio_state", n_audio_state)?,
        n_audio_head: to_i32("n_audio_head", n_audio_head)?,
        n_audio_layer: to_i32("n_audio_layer", n_audio_layer)?,
        n_text_ctx: to_i32("n_text_ctx", n_text_ctx)?,
        n_text_state: to_i32("n_text_state", n_text_state)?,
        n_text_head: to_i32("n_text_head", n_text_head)?,
        n_text_layer: to_i32("n_text_layer", n_text_layer)?,
        n_mels: to_i32("n_mels", n_mels)?,
        ftype: ggml::FTYPE_MOSTLY_F16,
    })
}

/// Destination of one row block of a fused CTranslate2 projection.
struct Part<'a> {
    /// ggml name prefix, e.g. `encoder.blocks.0.attn.query`.
    prefix: &'a str,
    /// whisper.cpp has a bias tensor for this projection (false for keys).
    has_bias: bool,
}

struct Converter<'a, W: Write> {
    model: &'a mut Ct2Model,
    out: GgmlWriter<W>,
    out_path: &'a Path,
    tensors_written: usize,
    max_dropped_key_bias: f32,
}

impl<W: Write> Converter<'_, W> {
    fn io(&self, e: io::Error) -> ConvertError {
        ConvertError::io(self.out_path, e)
    }

    fn write_all(
        &mut self,
        hp: &WhisperHparams,
        filters: &[f32],
        vocab: &[Vec<u8>],
    ) -> Result<(), ConvertError> {
        self.out.write_header(hp).map_err(|e| self.io(e))?;
        self.out
            .write_mel_filters(hp.n_mels, to_i32("n_freq", mel::N_FFT / 2 + 1)?, filters)
            .map_err(|e| self.io(e))?;
        self.out.write_vocab(vocab).map_err(|e| self.io(e))?;

        let d = dim(hp.n_audio_state);
        let n_mels = dim(hp.n_mels);

        // Encoder stem. Sinusoidal position encodings are stored by
        // CTranslate2, and whisper.cpp reads them rather than computing them.
        self.f32_tensor(
            "encoder/position_encodings/encodings",
            "encoder.positional_embedding",
            &[dim(hp.n_audio_ctx), d],
        )?;
        self.f16_tensor(
            "encoder/conv1/weight",
            "encoder.conv1.weight",
            &[d, n_mels, 3],
        )?;
        self.conv_bias("encoder/conv1/bias", "encoder.conv1.bias", d)?;
        self.f16_tensor("encoder/conv2/weight", "encoder.conv2.weight", &[d, d, 3])?;
        self.conv_bias("encoder/conv2/bias", "encoder.conv2.bias", d)?;

        for i in 0..dim(hp.n_audio_layer) {
            let (src, dst) = (format!("encoder/layer_{i}"), format!("encoder.blocks.{i}"));
            self.self_attention(&src, &dst, d)?;
            self.ffn(&src, &dst, d)?;
        }
        self.layer_norm("encoder/layer_norm", "encoder.ln_post", d)?;

        // Decoder. CTranslate2's `decoder/projection/weight` is an alias of
        // the embedding (Whisper ties them), which whisper.cpp also assumes.
        self.f32_tensor(
            "decoder/position_encodings/encodings",
            "decoder.positional_embedding",
            &[dim(hp.n_text_ctx), d],
        )?;
        self.f16_tensor(
            "decoder/embeddings/weight",
            "decoder.token_embedding.weight",
            &[dim(hp.n_vocab), d],
        )?;
        for i in 0..dim(hp.n_text_layer) {
            let (src, dst) = (format!("decoder/layer_{i}"), format!("decoder.blocks.{i}"));
            self.self_attention(&src, &dst, d)?;

            let (xsrc, xdst) = (format!("{src}/attention"), format!("{dst}.cross_attn"));
            self.layer_norm(
                &format!("{xsrc}/layer_norm"),
                &format!("{dst}.cross_attn_ln"),
                d,
            )?;
            self.linear(&format!("{xsrc}/linear_0"), &format!("{xdst}.query"), d, d)?;
            self.fused(
                &format!("{xsrc}/linear_1"),
                &[
                    Part {
                        prefix: &format!("{xdst}.key"),
                        has_bias: false,
                    },
                    Part {
                        prefix: &format!("{xdst}.value"),
                        has_bias: true,
                    },
                ],
                d,
            )?;
            self.linear(&format!("{xsrc}/linear_2"), &format!("{xdst}.out"), d, d)?;

            self.ffn(&src, &dst, d)?;
        }
        self.layer_norm("decoder/layer_norm", "decoder.ln", d)
    }

    fn self_attention(&mut self, src: &str, dst: &str, d: usize) -> Result<(), ConvertError> {
        let s = format!("{src}/self_attention");
        self.layer_norm(&format!("{s}/layer_norm"), &format!("{dst}.attn_ln"), d)?;
        self.fused(
            &format!("{s}/linear_0"),
            &[
                Part {
                    prefix: &format!("{dst}.attn.query"),
                    has_bias: true,
                },
                Part {
                    prefix: &format!("{dst}.attn.key"),
                    has_bias: false,
                },
                Part {
                    prefix: &format!("{dst}.attn.value"),
                    has_bias: true,
                },
            ],
            d,
        )?;
        self.linear(&format!("{s}/linear_1"), &format!("{dst}.attn.out"), d, d)
    }

    fn ffn(&mut self, src: &str, dst: &str, d: usize) -> Result<(), ConvertError> {
        let s = format!("{src}/ffn");
        self.layer_norm(&format!("{s}/layer_norm"), &format!("{dst}.mlp_ln"), d)?;
        // Whisper's MLP is always 4x wide.
        self.linear(&format!("{s}/linear_0"), &format!("{dst}.mlp.0"), 4 * d, d)?;
        self.linear(&format!("{s}/linear_1"), &format!("{dst}.mlp.2"), d, 4 * d)
    }

    fn layer_norm(&mut self, src: &str, dst: &str, d: usize) -> Result<(), ConvertError> {
        self.f32_tensor(&format!("{src}/gamma"), &format!("{dst}.weight"), &[d])?;
        self.f32_tensor(&format!("{src}/beta"), &format!("{dst}.bias"), &[d])
    }

    fn linear(
        &mut self,
        src: &str,
        dst: &str,
        out_dim: usize,
        in_dim: usize,
    ) -> Result<(), ConvertError> {
        self.f16_tensor(
            &format!("{src}/weight"),
            &format!("{dst}.weight"),
            &[out_dim, in_dim],
        )?;
        let bias = self.bias_or_zeros(&format!("{src}/bias"), out_dim)?;
        self.emit(&format!("{dst}.bias"), &[out_dim], TensorData::F32(&bias))
    }

    /// Split a row-fused projection (`[parts * d, d]` weight, `[parts * d]`
    /// bias) into one whisper.cpp projection per part.
    fn fused(&mut self, src: &str, parts: &[Part<'_>], d: usize) -> Result<(), ConvertError> {
        let w_name = format!("{src}/weight");
        self.expect_shape(&w_name, &[parts.len() * d, d])?;
        let weight = self.model.read_values(&w_name, f16::from_f32)?;
        let bias = self.bias_or_zeros(&format!("{src}/bias"), parts.len() * d)?;
        for (i, part) in parts.iter().enumerate() {
            let rows = i * d..(i + 1) * d;
            let w = &weight[rows.start * d..rows.end * d];
            self.emit(
                &format!("{}.weight", part.prefix),
                &[d, d],
                TensorData::F16(w),
            )?;
            let b = &bias[rows];
            if part.has_bias {
                self.emit(&format!("{}.bias", part.prefix), &[d], TensorData::F32(b))?;
            } else {
                let max = b.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                self.max_dropped_key_bias = self.max_dropped_key_bias.max(max);
            }
        }
        Ok(())
    }

    /// CTranslate2 may omit a linear layer's bias; that means zero, and
    /// whisper.cpp still needs the tensor.
    fn bias_or_zeros(&mut self, name: &str, len: usize) -> Result<Vec<f32>, ConvertError> {
        if self.model.get(name).is_none() {
            return Ok(vec![0.0; len]);
        }
        self.expect_shape(name, &[len])?;
        self.model.read_values(name, |v| v)
    }

    fn conv_bias(&mut self, src: &str, dst: &str, d: usize) -> Result<(), ConvertError> {
        self.expect_shape(src, &[d])?;
        let values = self.model.read_values(src, |v| v)?;
        // whisper.cpp allocates conv biases as ggml [1, d] so they broadcast
        // over time; in PyTorch order that is [d, 1].
        self.emit(dst, &[d, 1], TensorData::F32(&values))
    }

    fn f32_tensor(&mut self, src: &str, dst: &str, shape: &[usize]) -> Result<(), ConvertError> {
        self.expect_shape(src, shape)?;
        let values = self.model.read_values(src, |v| v)?;
        self.emit(dst, shape, TensorData::F32(&values))
    }

    fn f16_tensor(&mut self, src: &str, dst: &str, shape: &[usize]) -> Result<(), ConvertError> {
        self.expect_shape(src, shape)?;
        // f16 sources pass through exactly (f16 -> f32 -> f16 is lossless).
        let values = self.model.read_values(src, f16::from_f32)?;
        self.emit(dst, shape, TensorData::F16(&values))
    }

    fn expect_shape(&self, name: &str, expected: &[usize]) -> Result<(), ConvertError> {
        let found = &self.model.require(name)?.shape;
        if found != expected {
            return Err(ConvertError::Shape {
                name: name.to_owned(),
                expected: expected.to_vec(),
                found: found.clone(),
            });
        }
        Ok(())
    }

    fn emit(
        &mut self,
        name: &str,
        shape: &[usize],
        data: TensorData<'_>,
    ) -> Result<(), ConvertError> {
        self.out
            .write_tensor(name, shape, data)
            .map_err(|e| self.io(e))?;
        self.tensors_written += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use half::f16;

    use super::ct2::tests::{Ct2Builder, temp_dir};
    use super::*;

    const D: usize = 64; // one 64-wide head, as in every Whisper size
    const N_MELS: usize = 80;
    const AUDIO_CTX: usize = 10;
    const TEXT_CTX: usize = 6;
    const N_VOCAB: usize = 51864; // English-only layout

    /// Value pattern that encodes the row, so splits can be checked.
    fn rows_pattern(rows: usize, cols: usize) -> Vec<f32> {
        (0..rows * cols).map(|i| (i / cols) as f32).collect()
    }

    fn add_linear(b: &mut Ct2Builder, scope: &str, out_dim: usize, in_dim: usize, bias: f32) {
        b.f16(
            &format!("{scope}/weight"),
            &[out_dim as u32, in_dim as u32],
            &rows_pattern(out_dim, in_dim),
        );
        b.f16(
            &format!("{scope}/bias"),
            &[out_dim as u32],
            &vec![bias; out_dim],
        );
    }

    fn add_norm(b: &mut Ct2Builder, scope: &str) {
        b.f16(&format!("{scope}/gamma"), &[D as u32], &vec![1.0; D]);
        b.f16(&format!("{scope}/beta"), &[D as u32], &vec![0.0; D]);
    }

    fn add_fused(b: &mut Ct2Builder, scope: &str, biases: &[f32]) {
        let rows = biases.len() * D;
        b.f16(
            &format!("{scope}/weight"),
            &[rows as u32, D as u32],
            &rows_pattern(rows, D),
        );
        let bias: Vec<f32> = biases.iter().flat_map(|v| vec![*v; D]).collect();
        b.f16(&format!("{scope}/bias"), &[rows as u32], &bias);
    }

    /// A one-layer Whisper-shaped CTranslate2 model plus vocabulary.
    fn synthetic_model_dir(tag: &str) -> PathBuf {
        let d = D as u32;
        let mut b = Ct2Builder::default();
        b.i16_scalar("encoder/num_heads", 1)
            .i16_scalar("decoder/num_heads", 1);
        b.f16(
            "encoder/conv1/weight",
            &[d, N_MELS as u32, 3],
            &rows_pattern(D, N_MELS * 3),
        );
        b.f16("encoder/conv1/bias", &[d], &vec![0.5; D]);
        b.f16("encoder/conv2/weight", &[d, d, 3], &rows_pattern(D, D * 3));
        b.f16("encoder/conv2/bias", &[d], &vec![0.25; D]);
        b.f32(
            "encoder/position_encodings/encodings",
            &[AUDIO_CTX as u32, d],
            &rows_pattern(AUDIO_CTX, D),
        );
        add_norm(&mut b, "encoder/layer_norm");
        add_norm(&mut b, "encoder/layer_0/self_attention/layer_norm");
        add_fused(
            &mut b,
            "encoder/layer_0/self_attention/linear_0",
            &[1.0, 0.0, 3.0],
        );
        add_linear(&mut b, "encoder/layer_0/self_attention/linear_1", D, D, 4.0);
        add_norm(&mut b, "encoder/layer_0/ffn/layer_norm");
        add_linear(&mut b, "encoder/layer_0/ffn/linear_0", 4 * D, D, 5.0);
        add_linear(&mut b, "encoder/layer_0/ffn/linear_1", D, 4 * D, 6.0);

        b.f16(
            "decoder/embeddings/weight",
            &[N_VOCAB as u32, d],
            &vec![0.125; N_VOCAB * D],
        );
        b.f16(
            "decoder/position_encodings/encodings",
            &[TEXT_CTX as u32, d],
            &rows_pattern(TEXT_CTX, D),
        );
        add_norm(&mut b, "decoder/layer_norm");
        add_norm(&mut b, "decoder/layer_0/self_attention/layer_norm");
        // A non-zero key bias, to check it is dropped and reported.
        add_fused(
            &mut b,
            "decoder/layer_0/self_attention/linear_0",
            &[1.0, 0.75, 3.0],
        );
        add_linear(&mut b, "decoder/layer_0/self_attention/linear_1", D, D, 4.0);
        add_norm(&mut b, "decoder/layer_0/attention/layer_norm");
        add_linear(&mut b, "decoder/layer_0/attention/linear_0", D, D, 7.0);
        add_fused(&mut b, "decoder/layer_0/attention/linear_1", &[0.0, 8.0]);
        add_linear(&mut b, "decoder/layer_0/attention/linear_2", D, D, 9.0);
        add_norm(&mut b, "decoder/layer_0/ffn/layer_norm");
        add_linear(&mut b, "decoder/layer_0/ffn/linear_0", 4 * D, D, 5.0);
        add_linear(&mut b, "decoder/layer_0/ffn/linear_1", D, 4 * D, 6.0);
        b.alias("decoder/projection/weight", "decoder/embeddings/weight");

        let dir = temp_dir(tag);
        fs::write(dir.join("model.bin"), b.build("WhisperSpec")).unwrap();
        let mut vocab: Vec<String> = (0..N_VOCAB).map(|i| format!("t{i}")).collect();
        vocab[0] = "Ġhello".into();
        vocab[50256] = "<|endoftext|>".into();
        vocab[50363] = "<|0.00|>".into();
        fs::write(dir.join("vocabulary.txt"), vocab.join("\n") + "\n").unwrap();
        dir
    }

    struct Ggml {
        header: Vec<i32>,
        n_mel_freq: (i32, i32),
        vocab: Vec<Vec<u8>>,
        tensors: BTreeMap<String, (i32, Vec<i32>, Vec<u8>)>,
    }

    struct Cursor<'a> {
        bytes: &'a [u8],
        pos: usize,
    }

    impl<'a> Cursor<'a> {
        fn take(&mut self, n: usize) -> &'a [u8] {
            let s = &self.bytes[self.pos..self.pos + n];
            self.pos += n;
            s
        }
        fn i32(&mut self) -> i32 {
            i32::from_le_bytes(self.take(4).try_into().unwrap())
        }
        fn at_end(&self) -> bool {
            self.pos == self.bytes.len()
        }
    }

    /// Read a ggml file back the way whisper.cpp's loader walks it.
    fn parse_ggml(bytes: &[u8]) -> Ggml {
        let mut c = Cursor { bytes, pos: 0 };
        assert_eq!(c.i32() as u32, ggml::GGML_MAGIC);
        let header: Vec<i32> = (0..11).map(|_| c.i32()).collect();
        let n_mel_freq = (c.i32(), c.i32());
        c.take((n_mel_freq.0 * n_mel_freq.1) as usize * 4);
        let n_vocab = c.i32();
        let vocab = (0..n_vocab)
            .map(|_| {
                let len = c.i32() as usize;
                c.take(len).to_vec()
            })
            .collect();
        let mut tensors = BTreeMap::new();
        while !c.at_end() {
            let (n_dims, name_len, ttype) = (c.i32(), c.i32(), c.i32());
            let ne: Vec<i32> = (0..n_dims).map(|_| c.i32()).collect();
            let name = String::from_utf8(c.take(name_len as usize).to_vec()).unwrap();
            let numel: i32 = ne.iter().product();
            let data = c
                .take(numel as usize * if ttype == 0 { 4 } else { 2 })
                .to_vec();
            assert!(tensors.insert(name, (ttype, ne, data)).is_none());
        }
        Ggml {
            header,
            n_mel_freq,
            vocab,
            tensors,
        }
    }

    fn f16s(data: &[u8]) -> Vec<f32> {
        data.chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect()
    }

    fn f32s(data: &[u8]) -> Vec<f32> {
        data.chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect()
    }

    /// Tensor names, ggml types and ggml dims (ne) whisper.cpp 1.8
    /// (`whisper_model_load`) allocates for an f16 model, for one layer.
    fn whisper_cpp_expected() -> BTreeMap<String, (i32, Vec<i32>)> {
        let (d, m, v) = (D as i32, N_MELS as i32, N_VOCAB as i32);
        let mut e = BTreeMap::new();
        let mut put =
            |name: &str, ttype: i32, ne: &[i32]| e.insert(name.to_owned(), (ttype, ne.to_vec()));
        put("encoder.positional_embedding", 0, &[d, AUDIO_CTX as i32]);
        put("encoder.conv1.weight", 1, &[3, m, d]);
        put("encoder.conv1.bias", 0, &[1, d]);
        put("encoder.conv2.weight", 1, &[3, d, d]);
        put("encoder.conv2.bias", 0, &[1, d]);
        put("encoder.ln_post.weight", 0, &[d]);
        put("encoder.ln_post.bias", 0, &[d]);
        put("decoder.positional_embedding", 0, &[d, TEXT_CTX as i32]);
        put("decoder.token_embedding.weight", 1, &[d, v]);
        put("decoder.ln.weight", 0, &[d]);
        put("decoder.ln.bias", 0, &[d]);
        for (p, attns) in [
            ("encoder.blocks.0", &["attn"][..]),
            ("decoder.blocks.0", &["attn", "cross_attn"][..]),
        ] {
            for a in attns {
                put(&format!("{p}.{a}_ln.weight"), 0, &[d]);
                put(&format!("{p}.{a}_ln.bias"), 0, &[d]);
                for proj in ["query", "key", "value", "out"] {
                    put(&format!("{p}.{a}.{proj}.weight"), 1, &[d, d]);
                    if proj != "key" {
                        put(&format!("{p}.{a}.{proj}.bias"), 0, &[d]);
                    }
                }
            }
            put(&format!("{p}.mlp_ln.weight"), 0, &[d]);
            put(&format!("{p}.mlp_ln.bias"), 0, &[d]);
            put(&format!("{p}.mlp.0.weight"), 1, &[d, 4 * d]);
            put(&format!("{p}.mlp.0.bias"), 0, &[4 * d]);
            put(&format!("{p}.mlp.2.weight"), 1, &[4 * d, d]);
            put(&format!("{p}.mlp.2.bias"), 0, &[d]);
        }
        e
    }

    #[test]
    fn synthetic_model_converts_to_whisper_cpp_layout() {
        let dir = synthetic_model_dir("convert");
        let out = dir.join("ggml.bin");
        let summary = convert_ct2_dir(&dir, &out).unwrap();
        let bytes = fs::read(&out).unwrap();
        assert!(!dir.join("ggml.bin.partial").exists());
        assert_eq!(summary.bytes_written, bytes.len() as u64);
        let g = parse_ggml(&bytes);

        let d = D as i32;
        assert_eq!(
            g.header,
            vec![
                N_VOCAB as i32,
                AUDIO_CTX as i32,
                d,
                1,
                1,
                TEXT_CTX as i32,
                d,
                1,
                1,
                N_MELS as i32,
                1
            ]
        );
        assert_eq!(g.n_mel_freq, (80, 201));
        assert_eq!(g.vocab.len(), 50256);
        assert_eq!(g.vocab[0], b" hello");

        let found: BTreeMap<String, (i32, Vec<i32>)> = g
            .tensors
            .iter()
            .map(|(k, (t, ne, _))| (k.clone(), (*t, ne.clone())))
            .collect();
        assert_eq!(found, whisper_cpp_expected());
        assert_eq!(summary.tensors_written, found.len());

        // q|k|v rows land in the right tensors; the pattern value is the
        // source row index.
        let rows_of = |name: &str| {
            let v = f16s(&g.tensors[name].2);
            (v[0], v[v.len() - 1])
        };
        assert_eq!(rows_of("encoder.blocks.0.attn.query.weight"), (0.0, 63.0));
        assert_eq!(rows_of("encoder.blocks.0.attn.key.weight"), (64.0, 127.0));
        assert_eq!(
            rows_of("encoder.blocks.0.attn.value.weight"),
            (128.0, 191.0)
        );
        assert_eq!(
            rows_of("decoder.blocks.0.cross_attn.key.weight"),
            (0.0, 63.0)
        );
        assert_eq!(
            rows_of("decoder.blocks.0.cross_attn.value.weight"),
            (64.0, 127.0)
        );
        assert_eq!(
            f32s(&g.tensors["decoder.blocks.0.attn.value.bias"].2),
            vec![3.0; D]
        );
        assert_eq!(
            f32s(&g.tensors["decoder.blocks.0.cross_attn.value.bias"].2),
            vec![8.0; D]
        );
        assert_eq!(f32s(&g.tensors["encoder.conv1.bias"].2), vec![0.5; D]);
        assert_eq!(f32s(&g.tensors["decoder.positional_embedding"].2)[D], 1.0);
        assert_eq!(summary.max_dropped_key_bias, 0.75);
        assert_eq!(summary.source_dtypes.get("float16"), Some(&42));
        assert_eq!(summary.source_dtypes.get("float32"), Some(&1)); // encoder positions
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn int8_weights_are_dequantized() {
        let dir = synthetic_model_dir("int8");
        // Replace one linear weight by an int8 one with per-row scales.
        let mut b = Ct2Builder::default();
        let q: Vec<i8> = (0..D * D)
            .map(|i| if i % D == 0 { 100 } else { 0 })
            .collect();
        b.i8("x/weight", &[D as u32, D as u32], &q);
        b.f32("x/weight_scale", &[D as u32], &vec![50.0; D]);
        let path = dir.join("q.bin");
        fs::write(&path, b.build("WhisperSpec")).unwrap();
        let mut m = Ct2Model::open(&path).unwrap();
        let w = m.read_values("x/weight", f16::from_f32).unwrap();
        assert_eq!(w[0].to_f32(), 2.0);
        assert_eq!(w[1].to_f32(), 0.0);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn errors_are_reported_not_panicked() {
        let dir = synthetic_model_dir("errors");
        let out = dir.join("ggml.bin");

        // Vocabulary size must match the embedding matrix.
        fs::write(dir.join("vocabulary.txt"), "a\nb\n").unwrap();
        assert!(matches!(
            convert_ct2_dir(&dir, &out),
            Err(ConvertError::Vocabulary(_))
        ));
        assert!(!out.exists() && !dir.join("ggml.bin.partial").exists());

        // Another CTranslate2 spec is refused up front.
        let mut b = Ct2Builder::default();
        b.f32("x", &[1], &[0.0]);
        fs::write(dir.join("model.bin"), b.build("TransformerSpec")).unwrap();
        assert!(matches!(
            convert_ct2_dir(&dir, &out),
            Err(ConvertError::Unsupported(_))
        ));

        // Missing directory -> I/O error naming the file.
        let err = convert_ct2_dir(&dir.join("nope"), &out).unwrap_err();
        assert!(err.to_string().contains("model.bin"), "{err}");
        fs::remove_dir_all(dir).unwrap();
    }
}
