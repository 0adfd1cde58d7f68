//! Reader for CTranslate2's `model.bin`.
//!
//! Layout (little-endian; binary versions 4 to 6 share it):
//!
//! ```text
//! u32 binary_version
//! str spec_name            (str = u16 byte length incl. trailing NUL, bytes, NUL)
//! u32 spec_revision
//! u32 n_variables
//! n_variables x { str name, u8 rank, u32 dims[rank], u8 dtype, u32 n_bytes, data }
//! u32 n_aliases
//! n_aliases x { str alias, str target }
//! ```
//!
//! Opening the file only builds an index (name -> shape, dtype, file offset),
//! skipping over the data, so a tensor is read only when it is converted and
//! memory stays bounded by the largest tensor rather than the whole model.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use half::{bf16, f16};

use super::ConvertError;

/// Element types, numbered as in CTranslate2's `DataType` enum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Ct2DType {
    F32,
    I8,
    I16,
    I32,
    F16,
    BF16,
}

impl Ct2DType {
    fn from_id(id: u8) -> Option<Self> {
        Some(match id {
            0 => Self::F32,
            1 => Self::I8,
            2 => Self::I16,
            3 => Self::I32,
            4 => Self::F16,
            5 => Self::BF16,
            _ => return None,
        })
    }

    pub fn size(self) -> usize {
        match self {
            Self::I8 => 1,
            Self::I16 | Self::F16 | Self::BF16 => 2,
            Self::F32 | Self::I32 => 4,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "float32",
            Self::I8 => "int8",
            Self::I16 => "int16",
            Self::I32 => "int32",
            Self::F16 => "float16",
            Self::BF16 => "bfloat16",
        }
    }

    fn is_float(self) -> bool {
        matches!(self, Self::F32 | Self::F16 | Self::BF16)
    }

    /// Decode element `i` of a little-endian buffer as f32 (integers by value).
    fn decode(self, raw: &[u8], i: usize) -> f32 {
        let s = self.size();
        let b = &raw[i * s..(i + 1) * s];
        match self {
            Self::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            Self::F16 => f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32(),
            Self::BF16 => bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32(),
            Self::I8 => f32::from(i8::from_le_bytes([b[0]])),
            Self::I16 => f32::from(i16::from_le_bytes([b[0], b[1]])),
            // Only used for scalars and int8/int16 weights in practice; the
            // rounding of huge int32 values is irrelevant there.
            Self::I32 => i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f32,
        }
    }
}

/// Index entry of one stored variable.
#[derive(Debug, Clone)]
pub struct Ct2Var {
    pub shape: Vec<usize>,
    pub dtype: Ct2DType,
    offset: u64,
    n_bytes: usize,
}

impl Ct2Var {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// An opened `model.bin`: header, variable index and a handle to read data.
pub struct Ct2Model {
    path: PathBuf,
    file: BufReader<File>,
    pub spec_name: String,
    pub binary_version: u32,
    pub spec_revision: u32,
    vars: BTreeMap<String, Ct2Var>,
    aliases: BTreeMap<String, String>,
}

impl Ct2Model {
    pub fn open(path: &Path) -> Result<Self, ConvertError> {
        let io = |e| ConvertError::io(path, e);
        let file = File::open(path).map_err(io)?;
        let file_len = file.metadata().map_err(io)?.len();
        let mut r = BufReader::with_capacity(1 << 16, file);

        let binary_version = read_u32(&mut r).map_err(io)?;
        if !(4..=6).contains(&binary_version) {
            return Err(ConvertError::Unsupported(format!(
                "CTranslate2 binary version {binary_version} (supported: 4 to 6)"
            )));
        }
        let spec_name = read_str(&mut r, path)?;
        let spec_revision = read_u32(&mut r).map_err(io)?;
        let n_vars = read_u32(&mut r).map_err(io)?;

        let mut vars = BTreeMap::new();
        for _ in 0..n_vars {
            let name = read_str(&mut r, path)?;
            let rank = read_u8(&mut r).map_err(io)?;
            let mut shape = Vec::with_capacity(rank.into());
            for _ in 0..rank {
                shape.push(read_u32(&mut r).map_err(io)? as usize);
            }
            let type_id = read_u8(&mut r).map_err(io)?;
            let dtype = Ct2DType::from_id(type_id).ok_or_else(|| {
                ConvertError::Format(format!("{name}: unknown dtype id {type_id}"))
            })?;
            let n_bytes = read_u32(&mut r).map_err(io)? as usize;
            let expected = shape
                .iter()
                .try_fold(dtype.size(), |acc, d| acc.checked_mul(*d));
            if expected != Some(n_bytes) {
                return Err(ConvertError::Format(format!(
                    "{name}: {n_bytes} bytes stored for shape {shape:?} of {}",
                    dtype.name()
                )));
            }
            let offset = r.stream_position().map_err(io)?;
            if offset + n_bytes as u64 > file_len {
                return Err(ConvertError::Format(format!(
                    "{name}: data runs past the end of the file"
                )));
            }
            // seek_relative keeps BufReader's buffer when the skip is short.
            r.seek_relative(n_bytes as i64).map_err(io)?;
            vars.insert(
                name,
                Ct2Var {
                    shape,
                    dtype,
                    offset,
                    n_bytes,
                },
            );
        }

        let n_aliases = read_u32(&mut r).map_err(io)?;
        let mut aliases = BTreeMap::new();
        for _ in 0..n_aliases {
            let alias = read_str(&mut r, path)?;
            let target = read_str(&mut r, path)?;
            aliases.insert(alias, target);
        }

        Ok(Self {
            path: path.to_owned(),
            file: r,
            spec_name,
            binary_version,
            spec_revision,
            vars,
            aliases,
        })
    }

    /// All stored (non-alias) variables.
    pub fn variables(&self) -> impl Iterator<Item = (&str, &Ct2Var)> {
        self.vars.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Follow an alias (e.g. the tied output projection) to the stored name.
    /// CTranslate2 also aliases the `_scale` companion of an aliased weight.
    fn resolve<'a>(&'a self, name: &'a str) -> &'a str {
        if let Some(target) = self.aliases.get(name) {
            return target;
        }
        name
    }

    pub fn get(&self, name: &str) -> Option<&Ct2Var> {
        if let Some(v) = self.vars.get(self.resolve(name)) {
            return Some(v);
        }
        let stem = name.strip_suffix("_scale")?;
        let target = self.aliases.get(stem)?;
        self.vars.get(&format!("{target}_scale"))
    }

    pub fn require(&self, name: &str) -> Result<&Ct2Var, ConvertError> {
        self.get(name)
            .ok_or_else(|| ConvertError::MissingVariable(name.to_owned()))
    }

    fn read_raw(&mut self, var: &Ct2Var) -> Result<Vec<u8>, ConvertError> {
        let io = |e| ConvertError::io(&self.path, e);
        self.file.seek(SeekFrom::Start(var.offset)).map_err(io)?;
        let mut buf = vec![0u8; var.n_bytes];
        self.file.read_exact(&mut buf).map_err(io)?;
        Ok(buf)
    }

    /// Read an integer scalar such as `encoder/num_heads`.
    pub fn read_int_scalar(&mut self, name: &str) -> Result<Option<i64>, ConvertError> {
        let Some(var) = self.get(name).cloned() else {
            return Ok(None);
        };
        if var.numel() != 1 || var.dtype.is_float() {
            return Err(ConvertError::Format(format!(
                "{name}: expected an integer scalar, found {} {:?}",
                var.dtype.name(),
                var.shape
            )));
        }
        let raw = self.read_raw(&var)?;
        Ok(Some(var.dtype.decode(&raw, 0) as i64))
    }

    /// Read a tensor as real values, mapping each through `convert`.
    ///
    /// Quantized weights are dequantized on the fly: CTranslate2 stores int8
    /// weights as `round(w * scale[row])` with a per-output-row
    /// `<name>_scale` vector and int16 weights with one scalar scale, so
    /// `w = q / scale`. Converting element by element straight into the
    /// output type avoids an f32 copy of the whole tensor.
    pub fn read_values<T>(
        &mut self,
        name: &str,
        convert: impl Fn(f32) -> T,
    ) -> Result<Vec<T>, ConvertError> {
        let var = self.require(name)?.clone();
        let scale_name = format!("{name}_scale");
        let scale = match self.get(&scale_name).cloned() {
            Some(sv) if !var.dtype.is_float() => {
                let raw = self.read_raw(&sv)?;
                let s: Vec<f32> = (0..sv.numel()).map(|i| sv.dtype.decode(&raw, i)).collect();
                let rows = var.shape.first().copied().unwrap_or(1);
                if s.len() != 1 && s.len() != rows {
                    return Err(ConvertError::Format(format!(
                        "{scale_name}: {} scales for {rows} rows",
                        s.len()
                    )));
                }
                Some(s)
            }
            _ if !var.dtype.is_float() => {
                return Err(ConvertError::Unsupported(format!(
                    "{name}: {} tensor without a {scale_name} to dequantize it",
                    var.dtype.name()
                )));
            }
            _ => None,
        };

        let raw = self.read_raw(&var)?;
        let numel = var.numel();
        let row_len = match var.shape.first() {
            Some(&rows) if rows > 0 => numel / rows,
            _ => numel.max(1),
        };
        let dtype = var.dtype;
        let out = (0..numel)
            .map(|i| {
                let v = dtype.decode(&raw, i);
                let v = match &scale {
                    Some(s) if s.len() == 1 => v / s[0],
                    Some(s) => v / s[i / row_len],
                    None => v,
                };
                convert(v)
            })
            .collect();
        Ok(out)
    }
}

fn read_u8(r: &mut impl Read) -> std::io::Result<u8> {
    let mut b = [0u8; 1];
    r.read_exact(&mut b)?;
    Ok(b[0])
}

fn read_u16(r: &mut impl Read) -> std::io::Result<u16> {
    let mut b = [0u8; 2];
    r.read_exact(&mut b)?;
    Ok(u16::from_le_bytes(b))
}

fn read_u32(r: &mut impl Read) -> std::io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

fn read_str(r: &mut impl Read, path: &Path) -> Result<String, ConvertError> {
    let len = read_u16(r).map_err(|e| ConvertError::io(path, e))?;
    let mut buf = vec![0u8; len.into()];
    r.read_exact(&mut buf)
        .map_err(|e| ConvertError::io(path, e))?;
    // The stored length counts a trailing NUL terminator.
    if buf.pop() != Some(0) {
        return Err(ConvertError::Format("string without NUL terminator".into()));
    }
    String::from_utf8(buf).map_err(|_| ConvertError::Format("string is not UTF-8".into()))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds a `model.bin` in memory, for tests of the reader and converter.
    #[derive(Default)]
    pub(crate) struct Ct2Builder {
        vars: Vec<(String, Vec<u32>, u8, Vec<u8>)>,
        aliases: Vec<(String, String)>,
    }

    impl Ct2Builder {
        pub(crate) fn f16(&mut self, name: &str, shape: &[u32], values: &[f32]) -> &mut Self {
            let data = values
                .iter()
                .flat_map(|v| f16::from_f32(*v).to_le_bytes())
                .collect();
            self.vars.push((name.into(), shape.into(), 4, data));
            self
        }
        pub(crate) fn f32(&mut self, name: &str, shape: &[u32], values: &[f32]) -> &mut Self {
            let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            self.vars.push((name.into(), shape.into(), 0, data));
            self
        }
        pub(crate) fn i8(&mut self, name: &str, shape: &[u32], values: &[i8]) -> &mut Self {
            let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            self.vars.push((name.into(), shape.into(), 1, data));
            self
        }
        pub(crate) fn i16_scalar(&mut self, name: &str, v: i16) -> &mut Self {
            self.vars
                .push((name.into(), vec![], 2, v.to_le_bytes().to_vec()));
            self
        }
        pub(crate) fn alias(&mut self, alias: &str, target: &str) -> &mut Self {
            self.aliases.push((alias.into(), target.into()));
            self
        }
        pub(crate) fn build(&self, spec: &str) -> Vec<u8> {
            fn put_str(out: &mut Vec<u8>, s: &str) {
                out.extend_from_slice(&(s.len() as u16 + 1).to_le_bytes());
                out.extend_from_slice(s.as_bytes());
                out.push(0);
            }
            let mut out = Vec::new();
            out.extend_from_slice(&6u32.to_le_bytes());
            put_str(&mut out, spec);
            out.extend_from_slice(&3u32.to_le_bytes());
            out.extend_from_slice(&(self.vars.len() as u32).to_le_bytes());
            for (name, shape, dtype, data) in &self.vars {
                put_str(&mut out, name);
                out.push(shape.len() as u8);
                for d in shape {
                    out.extend_from_slice(&d.to_le_bytes());
                }
                out.push(*dtype);
                out.extend_from_slice(&(data.len() as u32).to_le_bytes());
                out.extend_from_slice(data);
            }
            out.extend_from_slice(&(self.aliases.len() as u32).to_le_bytes());
            for (a, t) in &self.aliases {
                put_str(&mut out, a);
                put_str(&mut out, t);
            }
            out
        }
    }

    pub(crate) fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ct2ggml-test-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn reads_index_values_aliases_and_dequantizes() {
        let mut b = Ct2Builder::default();
        b.f16("a/weight", &[2, 2], &[1.0, -2.0, 0.5, 4.0])
            .f32("a/bias", &[2], &[0.25, -0.25])
            .i8("q/weight", &[2, 3], &[127, -64, 0, 10, 20, -30])
            .f32("q/weight_scale", &[2], &[127.0, 10.0])
            .i16_scalar("enc/num_heads", 6)
            .alias("proj/weight", "a/weight");
        let dir = temp_dir("reader");
        let path = dir.join("model.bin");
        std::fs::write(&path, b.build("WhisperSpec")).unwrap();

        let mut m = Ct2Model::open(&path).unwrap();
        assert_eq!(m.spec_name, "WhisperSpec");
        assert_eq!((m.binary_version, m.spec_revision), (6, 3));
        assert_eq!(m.require("a/weight").unwrap().shape, vec![2, 2]);
        assert_eq!(
            m.read_values("a/weight", |v| v).unwrap(),
            vec![1.0, -2.0, 0.5, 4.0]
        );
        assert_eq!(
            m.read_values("proj/weight", |v| v).unwrap(),
            vec![1.0, -2.0, 0.5, 4.0]
        );
        assert_eq!(m.read_values("a/bias", |v| v).unwrap(), vec![0.25, -0.25]);
        // Row 0 scale 127, row 1 scale 10.
        let q = m.read_values("q/weight", |v| v).unwrap();
        let expect = [1.0, -64.0 / 127.0, 0.0, 1.0, 2.0, -3.0];
        assert!(
            q.iter().zip(expect).all(|(a, b)| (a - b).abs() < 1e-6),
            "{q:?}"
        );
        assert_eq!(m.read_int_scalar("enc/num_heads").unwrap(), Some(6));
        assert_eq!(m.read_int_scalar("dec/num_heads").unwrap(), None);
        assert!(matches!(
            m.read_values("nope", |v| v),
            Err(ConvertError::MissingVariable(_))
        ));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn rejects_truncated_files_and_bad_sizes() {
        let mut b = Ct2Builder::default();
        b.f32("x", &[4], &[1.0, 2.0, 3.0, 4.0]);
        let bytes = b.build("WhisperSpec");
        let dir = temp_dir("truncated");
        let path = dir.join("model.bin");
        std::fs::write(&path, &bytes[..bytes.len() - 8]).unwrap();
        assert!(Ct2Model::open(&path).is_err());

        let mut bad = Ct2Builder::default();
        bad.vars.push(("x".into(), vec![4], 0, vec![0; 12]));
        std::fs::write(&path, bad.build("WhisperSpec")).unwrap();
        assert!(matches!(
            Ct2Model::open(&path),
            Err(ConvertError::Format(_))
        ));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
