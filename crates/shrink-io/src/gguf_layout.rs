//! The one reader of a GGUF file's header, strict about its layout: every
//! count, length and size checked against the bytes present with checked arithmetic, and the rules
//! llama.cpp's `gguf_init_from_file` enforces (version 2 or 3, a power-of-two `general.alignment`
//! of type u32, unique keys and tensor names, at most 4 dimensions, rows of whole blocks, tensor
//! data laid out in order without gaps or overlaps, a data section that holds exactly the tensors).

use crate::ggml::GgmlType;
use crate::{IoError, Result};
use candle_core::quantized::gguf_file::Value;
use std::collections::BTreeMap;
use std::path::Path;

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
    pub dtype: GgmlType,
    pub elements: u64,
    /// Offset from the start of the data section.
    pub offset: u64,
    pub size_bytes: u64,
}

/// A GGUF file's checked layout and its metadata.
#[derive(Debug, Clone)]
pub struct GgufLayout {
    pub version: u32,
    pub alignment: u64,
    /// Every metadata value, by key.
    pub metadata: BTreeMap<String, Value>,
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

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let b = self.take(N as u64, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(b);
        Ok(a)
    }

    /// Reads one value of GGUF value type `ty`; `key` names it in errors. Arrays grow as their
    /// elements are read, so a stated count never allocates more than the bytes present hold.
    fn value(&mut self, ty: u32, key: &str, in_array: bool) -> Result<Value> {
        Ok(match ty {
            0 => Value::U8(self.array::<1>(key)?[0]),
            1 => Value::I8(self.array::<1>(key)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array(key)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(key)?)),
            4 => Value::U32(u32::from_le_bytes(self.array(key)?)),
            5 => Value::I32(i32::from_le_bytes(self.array(key)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(key)?)),
            7 => Value::Bool(self.array::<1>(key)?[0] != 0),
            8 => Value::String(self.string(key)?),
            10 => Value::U64(u64::from_le_bytes(self.array(key)?)),
            11 => Value::I64(i64::from_le_bytes(self.array(key)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(key)?)),
            9 if !in_array => {
                let elem = self.u32(key)?;
                if elem == 9 || elem > 12 {
                    return Err(self.fail(format!(
                        "metadata `{key}`: arrays of value type {elem} are not valid GGUF"
                    )));
                }
                let count = self.u64(key)?;
                let mut values = Vec::new();
                for _ in 0..count {
                    values.push(self.value(elem, key, true)?);
                }
                Value::Array(values)
            }
            other => {
                return Err(self.fail(format!(
                    "metadata `{key}` has value type {other}, which is not a GGUF type"
                )))
            }
        })
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
    let mut metadata = BTreeMap::new();
    for i in 0..kv_count {
        let key = r.string(&format!("metadata key {i}"))?;
        if metadata.contains_key(&key) {
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
            let value = r.u32(&key)?;
            alignment = u64::from(value);
            if alignment == 0 || !alignment.is_power_of_two() {
                return Err(bad(format!("{alignment} is not a power of two")));
            }
            metadata.insert(key, Value::U32(value));
        } else {
            let value = r.value(ty, &key, false)?;
            metadata.insert(key, value);
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
        let dtype = GgmlType::from_id(type_id).ok_or_else(|| {
            tensor_err(format!(
                "ggml type id {type_id} is not one shrink reads (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1, Q2_K–Q6_K, Q8_K, IQ4_NL, IQ4_XS)"
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
        metadata,
        data_offset,
        tensors,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{GgufEntry, GgufValue, GgufWriter};

    /// What shrink's writer puts in a header — metadata of every kind it writes and an i-quant
    /// tensor candle could not read — comes back from the reader, and the tensor's blocks
    /// dequantize as the format says.
    #[test]
    fn metadata_and_i_quant_tensors_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        let metadata = vec![
            ("a.u32".to_string(), GgufValue::U32(7)),
            ("a.i32".to_string(), GgufValue::I32(-3)),
            ("a.f32".to_string(), GgufValue::F32(0.25)),
            ("a.bool".to_string(), GgufValue::Bool(true)),
            ("a.str".to_string(), GgufValue::String("héllo".into())),
            (
                "a.strs".to_string(),
                GgufValue::StringArray(vec!["x".into(), String::new()]),
            ),
            ("a.i32s".to_string(), GgufValue::I32Array(vec![1, -2])),
            ("a.f32s".to_string(), GgufValue::F32Array(vec![1.5])),
            (
                "a.bools".to_string(),
                GgufValue::BoolArray(vec![true, false]),
            ),
        ];
        let entry = GgufEntry {
            name: "w".into(),
            dtype: GgmlType::IQ4NL,
            dims: vec![2, 32],
        };
        let mut writer = GgufWriter::create(&path, &metadata, vec![entry]).unwrap();
        // Two IQ4_NL blocks: scales 1 and -0.5, indices 0..15 twice (low nibbles, then high).
        let mut data = vec![];
        for d in [1.0f32, -0.5] {
            data.extend(half::f16::from_f32(d).to_le_bytes());
            data.extend((0..16u8).map(|i| i | (15 - i) << 4));
        }
        writer.append("w", &data).unwrap();
        writer.finish().unwrap();

        let bytes = std::fs::read(&path).unwrap();
        let layout = check_gguf_layout(&path, &bytes).unwrap();
        let m = &layout.metadata;
        assert_eq!(m["a.u32"].to_u32().unwrap(), 7);
        assert_eq!(m["a.i32"].to_i32().unwrap(), -3);
        assert_eq!(m["a.f32"].to_f32().unwrap(), 0.25);
        assert!(m["a.bool"].to_bool().unwrap());
        let bools: Vec<bool> = m["a.bools"]
            .to_vec()
            .unwrap()
            .iter()
            .map(|v| v.to_bool().unwrap())
            .collect();
        assert_eq!(bools, [true, false]);
        assert_eq!(m["a.str"].to_string().unwrap(), "héllo");
        let strs: Vec<String> = m["a.strs"]
            .to_vec()
            .unwrap()
            .iter()
            .map(|v| v.to_string().unwrap().clone())
            .collect();
        assert_eq!(strs, ["x", ""]);
        assert_eq!(m["a.i32s"].to_vec().unwrap()[1].to_i32().unwrap(), -2);
        assert_eq!(m["a.f32s"].to_vec().unwrap()[0].to_f32().unwrap(), 1.5);
        assert_eq!(m.len(), metadata.len());

        let t = &layout.tensors[0];
        assert_eq!(
            (t.dtype, t.dims.clone(), t.size_bytes),
            (GgmlType::IQ4NL, vec![32, 2], 36)
        );
        let start = (layout.data_offset + t.offset) as usize;
        let w = crate::ggml::dequantize(t.dtype, &bytes[start..start + 36], &[2, 32])
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let book = shrink_core::iquant::tables::KVALUES_IQ4NL;
        for (r, d) in [1.0f32, -0.5].into_iter().enumerate() {
            for i in 0..16 {
                assert_eq!(w[r][i], d * book[i] as f32);
                assert_eq!(w[r][16 + i], d * book[15 - i] as f32);
            }
        }
    }
}
