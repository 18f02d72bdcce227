//! A strict reading of a GGUF file's layout, done before candle's reader sees the file: every
//! count, length and size checked against the bytes present with checked arithmetic, and the rules
//! llama.cpp's `gguf_init_from_file` enforces (version 2 or 3, a power-of-two `general.alignment`
//! of type u32, unique keys and tensor names, at most 4 dimensions, rows of whole blocks, tensor
//! data laid out in order without gaps or overlaps, a data section that holds exactly the tensors).

use crate::{IoError, Result};
use candle_core::quantized::GgmlDType;
use std::path::Path;

/// ggml's type ids (ggml.h `enum ggml_type`) of the types candle reads.
pub(crate) const GGML_TYPES: [(u32, GgmlDType); 15] = [
    (0, GgmlDType::F32),
    (1, GgmlDType::F16),
    (2, GgmlDType::Q4_0),
    (3, GgmlDType::Q4_1),
    (6, GgmlDType::Q5_0),
    (7, GgmlDType::Q5_1),
    (8, GgmlDType::Q8_0),
    (9, GgmlDType::Q8_1),
    (10, GgmlDType::Q2K),
    (11, GgmlDType::Q3K),
    (12, GgmlDType::Q4K),
    (13, GgmlDType::Q5K),
    (14, GgmlDType::Q6K),
    (15, GgmlDType::Q8K),
    (30, GgmlDType::BF16),
];

/// The ggml type of a type id, if candle reads it.
pub(crate) fn ggml_type(id: u32) -> Option<GgmlDType> {
    GGML_TYPES.iter().find(|(i, _)| *i == id).map(|(_, t)| *t)
}

/// ggml's type id of a type.
pub(crate) fn ggml_type_id(dtype: GgmlDType) -> u32 {
    GGML_TYPES
        .iter()
        .find(|(_, t)| *t == dtype)
        .map(|(i, _)| *i)
        .unwrap_or(0)
}

/// llama.cpp's limits (ggml.h): dimensions per tensor and bytes in a tensor name.
const MAX_DIMS: u32 = 4;
const MAX_NAME: usize = 64;
const DEFAULT_ALIGNMENT: u64 = 32;

/// One tensor of a checked layout.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufTensorLayout {
    pub name: String,
    /// Dimensions in ggml order (fastest first).
    pub dims: Vec<u64>,
    pub dtype: GgmlDType,
    pub elements: u64,
    /// Offset from the start of the data section.
    pub offset: u64,
    pub size_bytes: u64,
}

/// A GGUF file's checked layout.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufLayout {
    pub version: u32,
    pub alignment: u64,
    /// Where the data section starts in the file.
    pub data_offset: u64,
    pub tensors: Vec<GgufTensorLayout>,
}

struct Reader<'a> {
    path: &'a Path,
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn fail(&self, message: String) -> IoError {
        IoError::Format {
            path: self.path.to_path_buf(),
            message,
        }
    }

    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8]> {
        let left = (self.bytes.len() - self.pos) as u64;
        if n > left {
            return Err(self.fail(format!(
                "corrupt or truncated GGUF header: {what} needs {n} bytes at offset {} but only {left} remain",
                self.pos
            )));
        }
        let start = self.pos;
        self.pos += n as usize;
        Ok(&self.bytes[start..self.pos])
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let len = self.u64(what)?;
        let b = self.take(len, what)?;
        String::from_utf8(b.to_vec()).map_err(|_| self.fail(format!("{what} is not UTF-8")))
    }

    /// Skips one value of type `ty`; `key` names it in errors.
    fn skip_value(&mut self, ty: u32, key: &str, in_array: bool) -> Result<()> {
        let fixed = |ty: u32| -> Option<u64> {
            match ty {
                0 | 1 | 7 => Some(1),
                2 | 3 => Some(2),
                4..=6 => Some(4),
                10..=12 => Some(8),
                _ => None,
            }
        };
        if let Some(n) = fixed(ty) {
            self.take(n, key)?;
            return Ok(());
        }
        match ty {
            8 => {
                let len = self.u64(key)?;
                self.take(len, key)?;
            }
            9 if !in_array => {
                let elem = self.u32(key)?;
                let count = self.u64(key)?;
                match (elem, fixed(elem)) {
                    (_, Some(n)) => {
                        let total = count.checked_mul(n).ok_or_else(|| {
                            self.fail(format!(
                                "metadata `{key}`: array of {count} elements overflows"
                            ))
                        })?;
                        self.take(total, key)?;
                    }
                    (8, None) => {
                        for _ in 0..count {
                            self.skip_value(8, key, true)?;
                        }
                    }
                    (other, None) => {
                        return Err(self.fail(format!(
                            "metadata `{key}`: arrays of value type {other} are not valid GGUF"
                        )))
                    }
                }
            }
            other => {
                return Err(self.fail(format!(
                    "metadata `{key}` has value type {other}, which is not a GGUF type"
                )))
            }
        }
        Ok(())
    }
}

/// Reads and checks the layout of GGUF `bytes` (the file at `path`, named in errors). Nothing is
/// allocated in proportion to a count or length the file states before the bytes are seen.
pub fn check_gguf_layout(path: &Path, bytes: &[u8]) -> Result<GgufLayout> {
    let mut r = Reader {
        path,
        bytes,
        pos: 0,
    };
    let magic = r.take(4, "the magic number")?;
    if magic != b"GGUF" {
        return Err(r.fail("not a GGUF file (the magic number is not 'GGUF')".into()));
    }
    let version = r.u32("the version")?;
    if !(2..=3).contains(&version) {
        return Err(r.fail(format!(
            "GGUF version {version} is not supported (versions 2 and 3 are, as in llama.cpp)"
        )));
    }
    let tensor_count = r.u64("the tensor count")?;
    let kv_count = r.u64("the metadata count")?;
    let mut alignment = DEFAULT_ALIGNMENT;
    let mut keys = std::collections::BTreeSet::new();
    for i in 0..kv_count {
        let key = r.string(&format!("metadata key {i}"))?;
        if !keys.insert(key.clone()) {
            return Err(IoError::Metadata {
                path: path.to_path_buf(),
                key,
                message: "appears twice".into(),
            });
        }
        let ty = r.u32(&key)?;
        if key == "general.alignment" {
            let bad = |message: String| IoError::Metadata {
                path: path.to_path_buf(),
                key: key.clone(),
                message,
            };
            if ty != 4 {
                return Err(bad(format!(
                    "must be a u32 (value type 4), found type {ty}"
                )));
            }
            alignment = u64::from(r.u32(&key)?);
            if alignment == 0 || !alignment.is_power_of_two() {
                return Err(bad(format!("{alignment} is not a power of two")));
            }
        } else {
            r.skip_value(ty, &key, false)?;
        }
    }
    let mut names = std::collections::BTreeSet::new();
    let mut tensors = Vec::new();
    for i in 0..tensor_count {
        let name = r.string(&format!("the name of tensor {i}"))?;
        let tensor_err = |message: String| IoError::Tensor {
            path: path.to_path_buf(),
            tensor: name.clone(),
            message,
        };
        if name.len() >= MAX_NAME {
            return Err(tensor_err(format!(
                "the name has {} bytes; llama.cpp allows at most {}",
                name.len(),
                MAX_NAME - 1
            )));
        }
        if !names.insert(name.clone()) {
            return Err(tensor_err("appears twice in the tensor table".into()));
        }
        let n_dims = r.u32(&name)?;
        if n_dims > MAX_DIMS {
            return Err(tensor_err(format!(
                "{n_dims} dimensions (at most {MAX_DIMS})"
            )));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        let mut elements: u64 = 1;
        for _ in 0..n_dims {
            let d = r.u64(&name)?;
            elements = elements
                .checked_mul(d)
                .filter(|&e| e <= i64::MAX as u64)
                .ok_or_else(|| {
                    tensor_err(format!(
                        "dimensions {:?} overflow a 64-bit element count",
                        dims.iter().chain([&d]).collect::<Vec<_>>()
                    ))
                })?;
            dims.push(d);
        }
        let type_id = r.u32(&name)?;
        let dtype = ggml_type(type_id).ok_or_else(|| {
            tensor_err(format!(
                "ggml type id {type_id} is not one shrink reads (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1, Q2_K–Q6_K, Q8_K)"
            ))
        })?;
        let block = dtype.block_size() as u64;
        let row = dims.first().copied().unwrap_or(1);
        if row % block != 0 {
            return Err(tensor_err(format!(
                "rows of {row} elements are not whole {dtype:?} blocks of {block}"
            )));
        }
        let size_bytes = (elements / block)
            .checked_mul(dtype.type_size() as u64)
            .ok_or_else(|| tensor_err("its size in bytes overflows".into()))?;
        let offset = r.u64(&name)?;
        tensors.push(GgufTensorLayout {
            name,
            dims,
            dtype,
            elements,
            offset,
            size_bytes,
        });
    }
    let header_end = r.pos as u64;
    let data_offset = header_end.div_ceil(alignment) * alignment;
    // Tensors follow each other in order, each padded to the alignment (llama.cpp's rule).
    let mut expected: u64 = 0;
    let mut last_pad = 0;
    for t in &tensors {
        if t.offset != expected {
            return Err(IoError::Tensor {
                path: path.to_path_buf(),
                tensor: t.name.clone(),
                message: format!(
                    "its data starts at offset {} of the data section, but the tensors before it end at {expected}: tensors must follow each other in order (overlapping, reordered or resized tensor data)",
                    t.offset
                ),
            });
        }
        let padded = t.size_bytes.div_ceil(alignment).checked_mul(alignment);
        expected = padded
            .and_then(|p| expected.checked_add(p))
            .ok_or_else(|| IoError::Tensor {
                path: path.to_path_buf(),
                tensor: t.name.clone(),
                message: "the data section's size overflows".into(),
            })?;
        last_pad = padded.unwrap_or(0) - t.size_bytes;
    }
    let file_len = bytes.len() as u64;
    let data_len = file_len.saturating_sub(data_offset);
    let needed = expected - last_pad;
    // Writers pad the last tensor (llama.cpp) or not (candle): both hold exactly the tensors.
    if let Some(last) = tensors.last() {
        if file_len < data_offset || (data_len != expected && data_len != needed) {
            return Err(IoError::Tensor {
                path: path.to_path_buf(),
                tensor: last.name.clone(),
                message: format!(
                    "the data section holds {data_len} bytes but the tensors need {needed}{}",
                    if data_len < needed {
                        " (truncated file)"
                    } else {
                        ": the tensor table does not describe the data (a changed type or size)"
                    }
                ),
            });
        }
    }
    Ok(GgufLayout {
        version,
        alignment,
        data_offset,
        tensors,
    })
}
