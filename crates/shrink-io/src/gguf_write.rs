//! The GGUF writer: metadata values, and a file written as its tensors become ready (header and
//! offsets planned first, data appended in order, renamed into place when complete).

use crate::ggml::GgmlType;
use crate::{io_error, IoError, Result};
use candle_core::quantized::QTensor;
use std::io::Write;
use std::path::Path;

/// A metadata value to write.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    StringArray(Vec<String>),
    I32Array(Vec<i32>),
    F32Array(Vec<f32>),
    BoolArray(Vec<bool>),
}

// GGUF value type ids.
const GGUF_U32: u32 = 4;
const GGUF_I32: u32 = 5;
const GGUF_F32: u32 = 6;
const GGUF_BOOL: u32 = 7;
const GGUF_STRING: u32 = 8;
const GGUF_ARRAY: u32 = 9;

fn put_str(w: &mut Vec<u8>, s: &str) {
    w.extend((s.len() as u64).to_le_bytes());
    w.extend(s.as_bytes());
}

impl GgufValue {
    /// Appends the value type id and the value.
    fn encode(&self, w: &mut Vec<u8>) {
        match self {
            GgufValue::U32(v) => {
                w.extend(GGUF_U32.to_le_bytes());
                w.extend(v.to_le_bytes());
            }
            GgufValue::I32(v) => {
                w.extend(GGUF_I32.to_le_bytes());
                w.extend(v.to_le_bytes());
            }
            GgufValue::F32(v) => {
                w.extend(GGUF_F32.to_le_bytes());
                w.extend(v.to_le_bytes());
            }
            GgufValue::Bool(v) => {
                w.extend(GGUF_BOOL.to_le_bytes());
                w.push(u8::from(*v));
            }
            GgufValue::String(v) => {
                w.extend(GGUF_STRING.to_le_bytes());
                put_str(w, v);
            }
            GgufValue::StringArray(v) => {
                w.extend(GGUF_ARRAY.to_le_bytes());
                w.extend(GGUF_STRING.to_le_bytes());
                w.extend((v.len() as u64).to_le_bytes());
                v.iter().for_each(|s| put_str(w, s));
            }
            GgufValue::I32Array(v) => {
                w.extend(GGUF_ARRAY.to_le_bytes());
                w.extend(GGUF_I32.to_le_bytes());
                w.extend((v.len() as u64).to_le_bytes());
                v.iter().for_each(|x| w.extend(x.to_le_bytes()));
            }
            GgufValue::F32Array(v) => {
                w.extend(GGUF_ARRAY.to_le_bytes());
                w.extend(GGUF_F32.to_le_bytes());
                w.extend((v.len() as u64).to_le_bytes());
                v.iter().for_each(|x| w.extend(x.to_le_bytes()));
            }
            GgufValue::BoolArray(v) => {
                w.extend(GGUF_ARRAY.to_le_bytes());
                w.extend(GGUF_BOOL.to_le_bytes());
                w.extend((v.len() as u64).to_le_bytes());
                w.extend(v.iter().map(|&b| u8::from(b)));
            }
        }
    }
}

/// A tensor to write: its GGUF name and ggml-typed data, in PyTorch dimension order.
#[derive(Debug)]
pub struct GgufTensor {
    pub name: String,
    pub tensor: QTensor,
}

/// A tensor of a GGUF being written: its name, ggml type and shape (PyTorch order), known before
/// its data.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufEntry {
    pub name: String,
    pub dtype: GgmlType,
    pub dims: Vec<usize>,
}

impl GgufEntry {
    /// The data's size in bytes (`None` when the rows do not hold whole blocks).
    pub fn bytes(&self) -> Option<usize> {
        let row = *self.dims.last().unwrap_or(&1);
        self.dtype.row_bytes(row)?;
        self.dtype.row_bytes(self.dims.iter().product())
    }
}

const GGUF_ALIGN: usize = 32;

/// The header, metadata and tensor table of a GGUF of `plan` (padded to the alignment), and the
/// bytes of its data (every tensor padded).
fn header(
    path: &Path,
    metadata: &[(String, GgufValue)],
    plan: &[GgufEntry],
) -> Result<(Vec<u8>, u64)> {
    let mut header = Vec::new();
    let w = &mut header;
    w.extend(0x4655_4747u32.to_le_bytes());
    w.extend(3u32.to_le_bytes());
    w.extend((plan.len() as u64).to_le_bytes());
    w.extend((metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        put_str(w, key);
        value.encode(w);
    }
    let mut offset = 0usize;
    for t in plan {
        let bytes = t.bytes().ok_or_else(|| IoError::Tensor {
            path: path.to_path_buf(),
            tensor: t.name.clone(),
            message: format!(
                "a {:?} tensor cannot have shape {:?}: its rows must hold whole blocks of {}",
                t.dtype,
                t.dims,
                t.dtype.block_size()
            ),
        })?;
        put_str(w, &t.name);
        w.extend((t.dims.len() as u32).to_le_bytes());
        for &d in t.dims.iter().rev() {
            w.extend((d as u64).to_le_bytes());
        }
        w.extend(t.dtype.id().to_le_bytes());
        w.extend((offset as u64).to_le_bytes());
        offset += bytes + gguf_pad(bytes);
    }
    header.extend(std::iter::repeat_n(0u8, gguf_pad(header.len())));
    Ok((header, offset as u64))
}

/// The size in bytes of the GGUF [`GgufWriter`] writes for `metadata` and `plan` (`path` names
/// the file in errors).
pub fn gguf_file_size(
    path: &Path,
    metadata: &[(String, GgufValue)],
    plan: &[GgufEntry],
) -> Result<u64> {
    let (header, data) = header(path, metadata, plan)?;
    Ok(header.len() as u64 + data)
}

fn gguf_pad(n: usize) -> usize {
    (GGUF_ALIGN - n % GGUF_ALIGN) % GGUF_ALIGN
}

/// A GGUF (version 3) written as its tensors become ready: the header, metadata and tensor table
/// go first, their offsets computed from the planned types and shapes, then each tensor's data is
/// appended in plan order, aligned to 32 bytes. The file appears under its name only when
/// [`GgufWriter::finish`] finds every tensor written.
pub struct GgufWriter {
    file: shrink_core::AtomicFile,
    plan: Vec<GgufEntry>,
    next: usize,
}

impl GgufWriter {
    /// Writes the header for `metadata` (in the given order) and the tensors of `plan`.
    pub fn create(
        path: &Path,
        metadata: &[(String, GgufValue)],
        plan: Vec<GgufEntry>,
    ) -> Result<Self> {
        Self::start(shrink_core::AtomicFile::create(path)?, metadata, plan)
    }

    /// [`GgufWriter::create`] into `file` (a fresh [`shrink_core::AtomicFile`]).
    pub fn start(
        mut file: shrink_core::AtomicFile,
        metadata: &[(String, GgufValue)],
        plan: Vec<GgufEntry>,
    ) -> Result<Self> {
        let path = file.target().to_path_buf();
        let (header, _) = header(&path, metadata, &plan)?;
        file.writer().write_all(&header).map_err(io_error(&path))?;
        Ok(Self {
            file,
            plan,
            next: 0,
        })
    }

    /// Continues the GGUF of `plan` in `file`, a partial file holding its header and the first
    /// `written` tensors (as [`GgufWriter::sync`] recorded them).
    pub fn resume(file: shrink_core::AtomicFile, plan: Vec<GgufEntry>, written: usize) -> Self {
        Self {
            file,
            plan,
            next: written,
        }
    }

    /// Flushes what was written to the disk; returns how many tensors and bytes the file holds.
    pub fn sync(&mut self) -> Result<(usize, u64)> {
        Ok((self.next, self.file.sync()?))
    }

    /// The tensor the next [`GgufWriter::append`] must write.
    pub fn next(&self) -> Option<&GgufEntry> {
        self.plan.get(self.next)
    }

    /// Appends the data of the next planned tensor, which must be `name` with exactly its size.
    pub fn append(&mut self, name: &str, data: &[u8]) -> Result<()> {
        let path = self.file.target().to_path_buf();
        let err = |message: String| IoError::Tensor {
            path: path.clone(),
            tensor: name.to_string(),
            message,
        };
        let Some(entry) = self.plan.get(self.next) else {
            return Err(err("written after every planned tensor".into()));
        };
        if entry.name != name {
            return Err(err(format!(
                "written out of order: '{}' comes next",
                entry.name
            )));
        }
        let want = entry.bytes().unwrap_or(0);
        if data.len() != want {
            return Err(err(format!(
                "{} bytes of data for a {:?} tensor of shape {:?} ({want} bytes)",
                data.len(),
                entry.dtype,
                entry.dims
            )));
        }
        let out = self.file.writer();
        out.write_all(data).map_err(io_error(&path))?;
        out.write_all(&[0u8; GGUF_ALIGN][..gguf_pad(data.len())])
            .map_err(io_error(&path))?;
        self.next += 1;
        Ok(())
    }

    /// Checks that every planned tensor was written, then puts the file in place.
    pub fn finish(self) -> Result<()> {
        if let Some(missing) = self.plan.get(self.next) {
            return Err(IoError::Tensor {
                path: self.file.target().to_path_buf(),
                tensor: missing.name.clone(),
                message: format!(
                    "never written ({} of {} tensors were)",
                    self.next,
                    self.plan.len()
                ),
            });
        }
        Ok(self.file.commit()?)
    }
}

/// Writes a GGUF atomically from tensors already in memory (see [`GgufWriter`]).
pub fn write_gguf(
    path: &Path,
    metadata: &[(String, GgufValue)],
    tensors: &[GgufTensor],
) -> Result<()> {
    let plan = tensors
        .iter()
        .map(|t| GgufEntry {
            name: t.name.clone(),
            dtype: crate::ggml::from_candle(t.tensor.dtype()),
            dims: t.tensor.shape().dims().to_vec(),
        })
        .collect();
    let mut writer = GgufWriter::create(path, metadata, plan)?;
    for t in tensors {
        let data = t.tensor.data().map_err(|e| IoError::Tensor {
            path: path.to_path_buf(),
            tensor: t.name.clone(),
            message: e.to_string(),
        })?;
        writer.append(&t.name, &data)?;
    }
    writer.finish()
}
