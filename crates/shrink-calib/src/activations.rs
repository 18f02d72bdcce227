//! The hidden states of the calibration windows at one depth, one tensor per batch of windows:
//! held in memory, or spilled to an unnamed scratch file and read back one batch at a time, so
//! that calibration holds one batch's states instead of all of them. Spilled values are the
//! stored bits, so a spilled pass computes exactly what an in-memory one does. The states are
//! kept in f32 (exact) or, at half the memory and disk, rounded to f16 or bf16 ([`Keep`]); they
//! are read back as f32 either way.

use crate::{CalibError, Result};
use candle_core::{DType, Device, Tensor};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// See the module documentation.
#[derive(Debug)]
pub struct Activations {
    store: Store,
    /// The type the values are kept in.
    dtype: DType,
}

/// Where and in what type a calibration pass keeps the activations between blocks: in memory or
/// spilled to a scratch file in `spill`, in f32 (the default: exact) or rounded to f16 or bf16
/// (half the bytes; the statistics then see the rounded inputs).
#[derive(Debug, Clone, Copy)]
pub struct Keep<'a> {
    pub spill: Option<&'a Path>,
    pub dtype: DType,
}

impl Default for Keep<'_> {
    fn default() -> Self {
        Self {
            spill: None,
            dtype: DType::F32,
        }
    }
}

impl<'a> Keep<'a> {
    /// Spilled to a scratch file in `dir`, in f32.
    pub fn spilled(dir: &'a Path) -> Self {
        Self {
            spill: Some(dir),
            ..Self::default()
        }
    }

    /// An empty store kept this way.
    pub fn store(&self) -> Result<Activations> {
        let store = match self.spill {
            Some(dir) => Activations::spilled_in(dir)?,
            None => Activations::in_memory(vec![]),
        };
        store.kept_in(self.dtype)
    }

    /// Bytes per value kept.
    pub fn value_bytes(&self) -> usize {
        self.dtype.size_in_bytes()
    }
}

#[derive(Debug)]
enum Store {
    Memory(Vec<Tensor>),
    Spilled {
        file: std::fs::File,
        /// Where the file was made (for error messages; the file itself has no name).
        dir: PathBuf,
        shapes: Vec<Vec<usize>>,
        offsets: Vec<u64>,
        end: u64,
    },
}

fn spill_error(dir: &Path, e: impl std::fmt::Display) -> CalibError {
    CalibError::Spill(format!("{}: {e}", dir.display()))
}

impl Activations {
    /// Batches held in memory.
    pub fn in_memory(batches: Vec<Tensor>) -> Self {
        Self {
            store: Store::Memory(batches),
            dtype: DType::F32,
        }
    }

    /// The same (empty) store keeping its values in `dtype`: f32, f16 or bf16.
    pub fn kept_in(self, dtype: DType) -> Result<Self> {
        if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
            return Err(CalibError::Spill(format!(
                "activations are kept in f32, f16 or bf16, not {dtype:?}"
            )));
        }
        if !self.is_empty() {
            return Err(CalibError::Spill(
                "the type of a store that holds batches".into(),
            ));
        }
        Ok(Self { dtype, ..self })
    }

    /// The type the values are kept in.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// `x` in the type the store keeps; a value beyond f16's range is refused rather than kept
    /// as an infinity.
    fn rounded(&self, x: Tensor) -> Result<Tensor> {
        if self.dtype == DType::F16 {
            let largest = x.abs()?.flatten_all()?.max(0)?.to_dtype(DType::F32)?;
            let largest = largest.to_scalar::<f32>()?;
            if largest > f32::from(half::f16::MAX) {
                return Err(CalibError::Spill(format!(
                    "a hidden state of {largest} is beyond f16's range (65504): keep the \
                     activations in bf16 or f32"
                )));
            }
        }
        Ok(x.to_dtype(self.dtype)?)
    }

    /// An empty store spilled to a scratch file in `dir` (removed by the system when the store is
    /// dropped, or the process killed); batches are added with [`Activations::push`].
    pub fn spilled_in(dir: &Path) -> Result<Self> {
        let file = tempfile::tempfile_in(dir).map_err(|e| spill_error(dir, e))?;
        Ok(Self {
            store: Store::Spilled {
                file,
                dir: dir.to_path_buf(),
                shapes: vec![],
                offsets: vec![],
                end: 0,
            },
            dtype: DType::F32,
        })
    }

    /// Whether the batches live in a scratch file.
    pub fn is_spilled(&self) -> bool {
        matches!(self.store, Store::Spilled { .. })
    }

    pub fn len(&self) -> usize {
        match &self.store {
            Store::Memory(xs) => xs.len(),
            Store::Spilled { shapes, .. } => shapes.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Adds a batch after the last (rounded to the type the store keeps).
    pub fn push(&mut self, x: Tensor) -> Result<()> {
        let x = self.rounded(x)?;
        match &mut self.store {
            Store::Memory(xs) => xs.push(x),
            Store::Spilled {
                file,
                dir,
                shapes,
                offsets,
                end,
            } => {
                let bytes = value_bytes(&x)?;
                file.write_all_at(&bytes, *end)
                    .map_err(|e| spill_error(dir, e))?;
                shapes.push(x.dims().to_vec());
                offsets.push(*end);
                *end += bytes.len() as u64;
            }
        }
        Ok(())
    }

    /// Batch `k` in f32 (read back from the scratch file when spilled).
    pub fn get(&self, k: usize) -> Result<Tensor> {
        let missing = || CalibError::Spill(format!("no batch {k} of {}", self.len()));
        let x = match &self.store {
            Store::Memory(xs) => xs.get(k).cloned().ok_or_else(missing)?,
            Store::Spilled {
                file,
                dir,
                shapes,
                offsets,
                ..
            } => {
                let shape = shapes.get(k).ok_or_else(missing)?;
                let n: usize = shape.iter().product();
                let mut bytes = vec![0u8; n * self.dtype.size_in_bytes()];
                file.read_exact_at(&mut bytes, offsets[k])
                    .map_err(|e| spill_error(dir, e))?;
                from_value_bytes(&bytes, self.dtype, shape)?
            }
        };
        Ok(x.to_dtype(DType::F32)?)
    }

    /// Replaces batch `k` (of the same shape when spilled: it is written over the old one).
    pub fn set(&mut self, k: usize, x: Tensor) -> Result<()> {
        let x = self.rounded(x)?;
        let len = self.len();
        let missing = || CalibError::Spill(format!("no batch {k} of {len}"));
        match &mut self.store {
            Store::Memory(xs) => *xs.get_mut(k).ok_or_else(missing)? = x,
            Store::Spilled {
                file,
                dir,
                shapes,
                offsets,
                ..
            } => {
                if shapes.get(k).ok_or_else(missing)? != x.dims() {
                    return Err(CalibError::Spill(format!(
                        "batch {k} of shape {:?} replaced by one of {:?}",
                        shapes[k],
                        x.dims()
                    )));
                }
                file.write_all_at(&value_bytes(&x)?, offsets[k])
                    .map_err(|e| spill_error(dir, e))?;
            }
        }
        Ok(())
    }

    /// Writes every batch to `path` (a small header of the type and the shapes, then the values
    /// as kept), one batch at a time: what a resumed job reads back with [`Activations::load`].
    pub fn save(&self, path: &Path) -> Result<()> {
        let io = |e: std::io::Error| spill_error(path, e);
        let shapes: Vec<Vec<usize>> = (0..self.len())
            .map(|k| match &self.store {
                Store::Memory(xs) => xs[k].dims().to_vec(),
                Store::Spilled { shapes, .. } => shapes[k].clone(),
            })
            .collect();
        let shapes = shapes
            .iter()
            .map(|s| {
                s.iter()
                    .map(|d| d.to_string())
                    .collect::<Vec<_>>()
                    .join("x")
            })
            .collect::<Vec<_>>()
            .join(",");
        let header = format!("{}:{shapes}", self.dtype.as_str());
        let mut out = std::io::BufWriter::new(std::fs::File::create(path).map_err(io)?);
        use std::io::Write;
        out.write_all(&(header.len() as u64).to_le_bytes())
            .map_err(io)?;
        out.write_all(header.as_bytes()).map_err(io)?;
        for k in 0..self.len() {
            let x = self.get(k)?.to_dtype(self.dtype)?;
            out.write_all(&value_bytes(&x)?).map_err(io)?;
        }
        let file = out.into_inner().map_err(|e| io(e.into_error()))?;
        file.sync_data().map_err(io)
    }

    /// The batches [`Activations::save`] wrote to `path`, kept as `keep` says (in memory or
    /// spilled; in the type they were saved in, which must be `keep`'s).
    pub fn load(path: &Path, keep: Keep) -> Result<Self> {
        let bad = |what: String| CalibError::Resume(format!("{}: {what}", path.display()));
        let file = std::fs::File::open(path).map_err(|e| bad(e.to_string()))?;
        let mut len = [0u8; 8];
        file.read_exact_at(&mut len, 0)
            .map_err(|e| bad(e.to_string()))?;
        let len = u64::from_le_bytes(len);
        if len > 1 << 20 {
            return Err(bad(format!("a header of {len} bytes")));
        }
        let mut header = vec![0u8; len as usize];
        file.read_exact_at(&mut header, 8)
            .map_err(|e| bad(e.to_string()))?;
        let header = String::from_utf8(header).map_err(|e| bad(e.to_string()))?;
        let (dtype, shapes) = header
            .split_once(':')
            .ok_or_else(|| bad("no type in the header".into()))?;
        if dtype != keep.dtype.as_str() {
            return Err(bad(format!(
                "activations saved in {dtype}, the job keeps them in {}",
                keep.dtype.as_str()
            )));
        }
        let shapes = shapes
            .split(',')
            .filter(|s| !s.is_empty())
            .map(|s| s.split('x').map(|d| d.parse::<usize>()).collect())
            .collect::<std::result::Result<Vec<Vec<usize>>, _>>()
            .map_err(|e| bad(format!("header: {e}")))?;
        let mut store = keep.store()?;
        let mut offset = 8 + len;
        for shape in shapes {
            let n: usize = shape.iter().product();
            let mut bytes = vec![0u8; n * keep.value_bytes()];
            file.read_exact_at(&mut bytes, offset)
                .map_err(|e| bad(format!("truncated ({e})")))?;
            offset += bytes.len() as u64;
            store.push(from_value_bytes(&bytes, keep.dtype, &shape)?)?;
        }
        Ok(store)
    }
}

/// The little-endian bytes of a tensor's values (f32, f16 or bf16).
fn value_bytes(x: &Tensor) -> Result<Vec<u8>> {
    let x = x.flatten_all()?;
    Ok(match x.dtype() {
        DType::F32 => bytemuck::cast_slice(&x.to_vec1::<f32>()?).to_vec(),
        DType::F16 => x
            .to_vec1::<half::f16>()?
            .iter()
            .flat_map(|v| v.to_bits().to_le_bytes())
            .collect(),
        DType::BF16 => x
            .to_vec1::<half::bf16>()?
            .iter()
            .flat_map(|v| v.to_bits().to_le_bytes())
            .collect(),
        other => {
            return Err(CalibError::Spill(format!(
                "activations of {other:?} are kept only in f32, f16 or bf16"
            )))
        }
    })
}

/// The tensor of `shape` whose values of `dtype` [`value_bytes`] wrote.
fn from_value_bytes(bytes: &[u8], dtype: DType, shape: &[usize]) -> Result<Tensor> {
    let cpu = &Device::Cpu;
    let u16s = || {
        bytes
            .chunks_exact(2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    Ok(match dtype {
        DType::F16 => Tensor::from_vec(u16s().map(half::f16::from_bits).collect(), shape, cpu)?,
        DType::BF16 => Tensor::from_vec(u16s().map(half::bf16::from_bits).collect(), shape, cpu)?,
        _ => {
            let values: Vec<f32> = bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            Tensor::from_vec(values, shape, cpu)?
        }
    })
}

#[cfg(test)]
mod tests;
