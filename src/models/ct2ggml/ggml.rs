//! Writer for the legacy ggml Whisper model file that whisper.cpp's
//! `whisper_model_load` reads. Everything is little-endian.
//!
//! ```text
//! u32 magic 0x67676d6c ("ggml")
//! i32 x 11 hparams: n_vocab, n_audio_ctx, n_audio_state, n_audio_head,
//!     n_audio_layer, n_text_ctx, n_text_state, n_text_head, n_text_layer,
//!     n_mels, ftype (0 = all f32, 1 = f16 weights)
//! i32 n_mel, i32 n_freq, f32 filters[n_mel * n_freq]
//! i32 n_tokens, n_tokens x { u32 len, bytes }
//! tensors until EOF: i32 n_dims, i32 name_len, i32 type (0 f32, 1 f16),
//!     i32 ne[n_dims] (ggml order: innermost first, i.e. the reverse of the
//!     PyTorch shape), name bytes, raw data
//! ```

use std::io::Write;

use half::f16;

use super::WhisperHparams;

pub const GGML_MAGIC: u32 = 0x6767_6d6c;

/// ftype value meaning "large matrices in f16, the rest in f32".
pub const FTYPE_MOSTLY_F16: i32 = 1;

/// Tensor payload in one of the two element types whisper.cpp accepts here.
pub enum TensorData<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
}

impl TensorData<'_> {
    fn len(&self) -> usize {
        match self {
            Self::F32(d) => d.len(),
            Self::F16(d) => d.len(),
        }
    }

    fn ggml_type(&self) -> i32 {
        match self {
            Self::F32(_) => 0,
            Self::F16(_) => 1,
        }
    }
}

pub struct GgmlWriter<W: Write> {
    out: W,
    bytes_written: u64,
}

impl<W: Write> GgmlWriter<W> {
    pub fn new(out: W) -> Self {
        Self {
            out,
            bytes_written: 0,
        }
    }

    pub fn bytes_written(&self) -> u64 {
        self.bytes_written
    }

    pub fn into_inner(self) -> W {
        self.out
    }

    fn put(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.out.write_all(bytes)?;
        self.bytes_written += bytes.len() as u64;
        Ok(())
    }

    fn put_i32(&mut self, v: i32) -> std::io::Result<()> {
        self.put(&v.to_le_bytes())
    }

    pub fn write_header(&mut self, hp: &WhisperHparams) -> std::io::Result<()> {
        self.put(&GGML_MAGIC.to_le_bytes())?;
        for v in [
            hp.n_vocab,
            hp.n_audio_ctx,
            hp.n_audio_state,
            hp.n_audio_head,
            hp.n_audio_layer,
            hp.n_text_ctx,
            hp.n_text_state,
            hp.n_text_head,
            hp.n_text_layer,
            hp.n_mels,
            hp.ftype,
        ] {
            self.put_i32(v)?;
        }
        Ok(())
    }

    /// `filters` is row-major `n_mel x n_freq`; whisper.cpp calls the second
    /// count `n_fft` but uses it as the number of frequency bins (201).
    pub fn write_mel_filters(
        &mut self,
        n_mel: i32,
        n_freq: i32,
        filters: &[f32],
    ) -> std::io::Result<()> {
        debug_assert_eq!(filters.len() as i64, i64::from(n_mel) * i64::from(n_freq));
        self.put_i32(n_mel)?;
        self.put_i32(n_freq)?;
        self.put_f32s(filters)
    }

    pub fn write_vocab(&mut self, tokens: &[Vec<u8>]) -> std::io::Result<()> {
        self.put_i32(to_i32(tokens.len())?)?;
        for t in tokens {
            self.put(&u32::try_from(t.len()).map_err(|_| too_big())?.to_le_bytes())?;
            self.put(t)?;
        }
        Ok(())
    }

    /// Write one tensor; `torch_shape` is outermost-first as in PyTorch.
    pub fn write_tensor(
        &mut self,
        name: &str,
        torch_shape: &[usize],
        data: TensorData<'_>,
    ) -> std::io::Result<()> {
        let numel: usize = torch_shape.iter().product();
        if numel != data.len() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{name}: {} values for shape {torch_shape:?}", data.len()),
            ));
        }
        self.put_i32(to_i32(torch_shape.len())?)?;
        self.put_i32(to_i32(name.len())?)?;
        self.put_i32(data.ggml_type())?;
        for &d in torch_shape.iter().rev() {
            self.put_i32(to_i32(d)?)?;
        }
        self.put(name.as_bytes())?;
        match data {
            TensorData::F32(d) => self.put_f32s(d),
            TensorData::F16(d) => self.put_f16s(d),
        }
    }

    // Encode through a small stack buffer: one write_all per element would be
    // slow, and a byte copy of the whole tensor would double peak memory.
    fn put_f32s(&mut self, values: &[f32]) -> std::io::Result<()> {
        let mut buf = [0u8; 4096];
        for chunk in values.chunks(buf.len() / 4) {
            for (dst, v) in buf.chunks_exact_mut(4).zip(chunk) {
                dst.copy_from_slice(&v.to_le_bytes());
            }
            self.put(&buf[..chunk.len() * 4])?;
        }
        Ok(())
    }

    fn put_f16s(&mut self, values: &[f16]) -> std::io::Result<()> {
        let mut buf = [0u8; 4096];
        for chunk in values.chunks(buf.len() / 2) {
            for (dst, v) in buf.chunks_exact_mut(2).zip(chunk) {
                dst.copy_from_slice(&v.to_le_bytes());
            }
            self.put(&buf[..chunk.len() * 2])?;
        }
        Ok(())
    }
}

fn too_big() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidInput,
        "value does not fit the ggml header field",
    )
}

fn to_i32(v: usize) -> std::io::Result<i32> {
    i32::try_from(v).map_err(|_| too_big())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensor_header_reverses_dims_and_tags_type() {
        let mut w = GgmlWriter::new(Vec::new());
        let vals = [
            f16::from_f32(1.0),
            f16::from_f32(-2.0),
            f16::ZERO,
            f16::ONE,
            f16::ONE,
            f16::ONE,
        ];
        w.write_tensor("x.w", &[2, 3], TensorData::F16(&vals))
            .unwrap();
        let n = w.bytes_written();
        let out = w.into_inner();
        assert_eq!(n as usize, out.len());
        let i32_at = |o: usize| i32::from_le_bytes(out[o..o + 4].try_into().unwrap());
        assert_eq!((i32_at(0), i32_at(4), i32_at(8)), (2, 3, 1));
        // ggml order: ne0 = 3 (row length), ne1 = 2.
        assert_eq!((i32_at(12), i32_at(16)), (3, 2));
        assert_eq!(&out[20..23], b"x.w");
        assert_eq!(&out[23..25], &f16::from_f32(1.0).to_le_bytes());
        assert_eq!(out.len(), 23 + 12);
    }

    #[test]
    fn vocab_is_length_prefixed_bytes() {
        let mut w = GgmlWriter::new(Vec::new());
        w.write_vocab(&[b"!".to_vec(), b" the".to_vec(), Vec::new()])
            .unwrap();
        let out = w.into_inner();
        assert_eq!(
            out,
            [
                &3i32.to_le_bytes()[..],
                &[1, 0, 0, 0, b'!'],
                &[4, 0, 0, 0],
                b" the",
                &[0, 0, 0, 0]
            ]
            .concat()
        );
    }

    #[test]
    fn shape_mismatch_is_an_error() {
        let mut w = GgmlWriter::new(Vec::new());
        assert!(
            w.write_tensor("x", &[2, 2], TensorData::F32(&[1.0]))
                .is_err()
        );
    }
}
