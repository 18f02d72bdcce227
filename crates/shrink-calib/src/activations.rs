//! The hidden states of the calibration windows at one depth, one tensor per batch of windows:
//! held in memory, or spilled to an unnamed scratch file and read back one batch at a time, so
//! that calibration holds one batch's states instead of all of them. Spilled values are the
//! stored bits (f32), so a spilled pass computes exactly what an in-memory one does.

use crate::{CalibError, Result};
use candle_core::{DType, Device, Tensor};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// See the module documentation.
#[derive(Debug)]
pub struct Activations {
    store: Store,
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
        }
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

    /// Adds a batch after the last.
    pub fn push(&mut self, x: Tensor) -> Result<()> {
        match &mut self.store {
            Store::Memory(xs) => xs.push(x),
            Store::Spilled {
                file,
                dir,
                shapes,
                offsets,
                end,
            } => {
                let bytes = f32_bytes(&x)?;
                file.write_all_at(&bytes, *end)
                    .map_err(|e| spill_error(dir, e))?;
                shapes.push(x.dims().to_vec());
                offsets.push(*end);
                *end += bytes.len() as u64;
            }
        }
        Ok(())
    }

    /// Batch `k` (read back from the scratch file when spilled).
    pub fn get(&self, k: usize) -> Result<Tensor> {
        let missing = || CalibError::Spill(format!("no batch {k} of {}", self.len()));
        match &self.store {
            Store::Memory(xs) => xs.get(k).cloned().ok_or_else(missing),
            Store::Spilled {
                file,
                dir,
                shapes,
                offsets,
                ..
            } => {
                let shape = shapes.get(k).ok_or_else(missing)?;
                let n: usize = shape.iter().product();
                let mut bytes = vec![0u8; n * 4];
                file.read_exact_at(&mut bytes, offsets[k])
                    .map_err(|e| spill_error(dir, e))?;
                let values: Vec<f32> = bytes
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect();
                Ok(Tensor::from_vec(values, shape.as_slice(), &Device::Cpu)?)
            }
        }
    }

    /// Replaces batch `k` (of the same shape when spilled: it is written over the old one).
    pub fn set(&mut self, k: usize, x: Tensor) -> Result<()> {
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
                file.write_all_at(&f32_bytes(&x)?, offsets[k])
                    .map_err(|e| spill_error(dir, e))?;
            }
        }
        Ok(())
    }

    /// Writes every batch to `path` (a small header of shapes, then the f32 values), one batch
    /// at a time: what a resumed job reads back with [`Activations::load`].
    pub fn save(&self, path: &Path) -> Result<()> {
        let io = |e: std::io::Error| spill_error(path, e);
        let shapes: Vec<Vec<usize>> = (0..self.len())
            .map(|k| match &self.store {
                Store::Memory(xs) => xs[k].dims().to_vec(),
                Store::Spilled { shapes, .. } => shapes[k].clone(),
            })
            .collect();
        let header = shapes
            .iter()
            .map(|s| {
                s.iter()
                    .map(|d| d.to_string())
                    .collect::<Vec<_>>()
                    .join("x")
            })
            .collect::<Vec<_>>()
            .join(",");
        let mut out = std::io::BufWriter::new(std::fs::File::create(path).map_err(io)?);
        use std::io::Write;
        out.write_all(&(header.len() as u64).to_le_bytes())
            .map_err(io)?;
        out.write_all(header.as_bytes()).map_err(io)?;
        for k in 0..self.len() {
            out.write_all(&f32_bytes(&self.get(k)?)?).map_err(io)?;
        }
        let file = out.into_inner().map_err(|e| io(e.into_error()))?;
        file.sync_data().map_err(io)
    }

    /// The batches [`Activations::save`] wrote to `path`, in memory or, with `spill`, spilled to
    /// a scratch file there.
    pub fn load(path: &Path, spill: Option<&Path>) -> Result<Self> {
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
        let shapes = header
            .split(',')
            .filter(|s| !s.is_empty())
            .map(|s| s.split('x').map(|d| d.parse::<usize>()).collect())
            .collect::<std::result::Result<Vec<Vec<usize>>, _>>()
            .map_err(|e| bad(format!("header: {e}")))?;
        let mut store = match spill {
            Some(dir) => Self::spilled_in(dir)?,
            None => Self::in_memory(vec![]),
        };
        let mut offset = 8 + len;
        for shape in shapes {
            let n: usize = shape.iter().product();
            let mut bytes = vec![0u8; n * 4];
            file.read_exact_at(&mut bytes, offset)
                .map_err(|e| bad(format!("truncated ({e})")))?;
            offset += bytes.len() as u64;
            let values: Vec<f32> = bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            store.push(Tensor::from_vec(values, shape.as_slice(), &Device::Cpu)?)?;
        }
        Ok(store)
    }
}

/// The little-endian bytes of an f32 tensor's values.
fn f32_bytes(x: &Tensor) -> Result<Vec<u8>> {
    if x.dtype() != DType::F32 {
        return Err(CalibError::Spill(format!(
            "activations of {:?} are spilled only in f32",
            x.dtype()
        )));
    }
    let values = x.flatten_all()?.to_vec1::<f32>()?;
    Ok(bytemuck::cast_slice(&values).to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spilled_batches_read_back_the_bits_written() {
        let dir = tempfile::tempdir().unwrap();
        let batch = |seed: f32, n: usize| {
            let v: Vec<f32> = (0..n * 6).map(|i| (i as f32 * 0.37 + seed).sin()).collect();
            Tensor::from_vec(v, (n, 2, 3), &Device::Cpu).unwrap()
        };
        let bits = |t: &Tensor| -> Vec<u32> {
            t.flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect()
        };
        let mut spilled = Activations::spilled_in(dir.path()).unwrap();
        let mut memory = Activations::in_memory(vec![]);
        for (k, n) in [2usize, 1, 2].iter().enumerate() {
            spilled.push(batch(k as f32, *n)).unwrap();
            memory.push(batch(k as f32, *n)).unwrap();
        }
        spilled.set(1, batch(9.0, 1)).unwrap();
        memory.set(1, batch(9.0, 1)).unwrap();
        assert!(spilled.set(0, batch(0.0, 1)).is_err(), "a shape change");
        assert!(spilled.get(3).is_err());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "unnamed");
        let saved = dir.path().join("saved");
        spilled.save(&saved).unwrap();
        for loaded in [
            Activations::load(&saved, None).unwrap(),
            Activations::load(&saved, Some(dir.path())).unwrap(),
        ] {
            assert_eq!(loaded.len(), 3);
            for k in 0..3 {
                let want = bits(&memory.get(k).unwrap());
                assert_eq!(bits(&spilled.get(k).unwrap()), want);
                assert_eq!(bits(&loaded.get(k).unwrap()), want);
                assert_eq!(loaded.get(k).unwrap().dims(), memory.get(k).unwrap().dims());
            }
        }
        std::fs::write(&saved, [3u8, 0, 0, 0, 0, 0, 0, 0, b'2', b'x', b'3']).unwrap();
        let e = Activations::load(&saved, None).unwrap_err();
        assert!(e.to_string().contains("truncated"), "{e}");
    }
}
