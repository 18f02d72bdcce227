//! compressed-tensors quantized weights in Hugging Face folders (the format vLLM and transformers
//! load, written by llm-compressor): `pack-quantized` (int4/int8 codes packed into int32 along
//! the input dimension, `weight_packed` + `weight_scale` [+ `weight_zero_point`] + `weight_shape`)
//! and `int-quantized` (int8 `weight` + `weight_scale`). Reading decompresses them to f32 weights,
//! `(q − zero_point) · scale`, so every other part of shrink sees a plain checkpoint.

use crate::{IoError, Result};
use candle_core::{DType, Device, Tensor};
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::Path;

/// A tensor stored exactly as given: dtype, shape and little-endian bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct RawTensor {
    pub dtype: safetensors::Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl RawTensor {
    pub fn from_tensor(t: &Tensor) -> candle_core::Result<Self> {
        let shape = t.dims().to_vec();
        let flat = t.flatten_all()?;
        let (dtype, data): (safetensors::Dtype, Vec<u8>) = match t.dtype() {
            DType::F32 => (
                safetensors::Dtype::F32,
                flat.to_vec1::<f32>()?
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            ),
            DType::F16 => (
                safetensors::Dtype::F16,
                flat.to_vec1::<half::f16>()?
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            ),
            DType::BF16 => (
                safetensors::Dtype::BF16,
                flat.to_vec1::<half::bf16>()?
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            ),
            other => candle_core::bail!("cannot store {other:?} as a raw tensor"),
        };
        Ok(Self { dtype, shape, data })
    }

    pub fn i32(shape: Vec<usize>, values: &[i32]) -> Self {
        Self {
            dtype: safetensors::Dtype::I32,
            shape,
            data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }

    pub fn i8(shape: Vec<usize>, values: &[i8]) -> Self {
        Self {
            dtype: safetensors::Dtype::I8,
            shape,
            data: values.iter().map(|&v| v as u8).collect(),
        }
    }

    pub fn i64(shape: Vec<usize>, values: &[i64]) -> Self {
        Self {
            dtype: safetensors::Dtype::I64,
            shape,
            data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }

    pub fn f16(shape: Vec<usize>, values: &[half::f16]) -> Self {
        Self {
            dtype: safetensors::Dtype::F16,
            shape,
            data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }
}

impl safetensors::View for &RawTensor {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// An int8 or int32 tensor read from a safetensors file.
#[derive(Debug, Clone, PartialEq)]
pub struct IntTensor {
    pub shape: Vec<usize>,
    pub values: Vec<i64>,
}

impl IntTensor {
    pub(crate) fn from_view(view: &safetensors::tensor::TensorView<'_>) -> Self {
        let values = match view.dtype() {
            safetensors::Dtype::I8 => view.data().iter().map(|&b| b as i8 as i64).collect(),
            _ => view
                .data()
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64)
                .collect(),
        };
        Self {
            shape: view.shape().to_vec(),
            values,
        }
    }
}

/// Replaces compressed-tensors quantized weights by their f32 values (no-op for other folders);
/// integer tensors that are not quantized weights become f32 tensors.
pub(crate) fn decompress(
    dir: &Path,
    config: &serde_json::Value,
    tensors: &mut crate::Tensors,
    mut ints: BTreeMap<String, IntTensor>,
) -> Result<()> {
    let qc = config.get("quantization_config");
    let method = qc
        .and_then(|q| q.get("quant_method"))
        .and_then(|m| m.as_str());
    if let (Some(qc), Some("compressed-tensors")) = (qc, method) {
        let format = qc.get("format").and_then(|f| f.as_str()).unwrap_or("");
        if !["pack-quantized", "int-quantized", "naive-quantized"].contains(&format) {
            return Err(IoError::Metadata {
                path: dir.join("config.json"),
                key: "quantization_config.format".into(),
                message: format!(
                    "compressed-tensors format '{format}' is not supported (pack-quantized, int-quantized)"
                ),
            });
        }
        let groups: Vec<(Vec<String>, u32)> = qc
            .get("config_groups")
            .and_then(|g| g.as_object())
            .map(|g| {
                g.values()
                    .map(|grp| {
                        let targets = grp
                            .get("targets")
                            .and_then(|t| t.as_array())
                            .map(|a| {
                                a.iter()
                                    .filter_map(|t| t.as_str().map(String::from))
                                    .collect()
                            })
                            .unwrap_or_default();
                        let bits = grp
                            .pointer("/weights/num_bits")
                            .and_then(|b| b.as_u64())
                            .unwrap_or(8) as u32;
                        (targets, bits)
                    })
                    .collect()
            })
            .unwrap_or_default();
        let err = |tensor: &str, message: String| IoError::Tensor {
            path: dir.to_path_buf(),
            tensor: tensor.to_string(),
            message,
        };
        let modules: Vec<String> = tensors
            .names()
            .filter_map(|n| n.strip_suffix(".weight_scale").map(String::from))
            .collect();
        for module in modules {
            let bits = groups
                .iter()
                .find(|(targets, _)| targets.iter().any(|t| target_matches(t, &module)))
                .map(|(_, b)| *b)
                .ok_or_else(|| {
                    err(
                        &format!("{module}.weight_scale"),
                        "no quantization_config group targets this module".into(),
                    )
                })?;
            if !(1..=8).contains(&bits) {
                return Err(IoError::Metadata {
                    path: dir.join("config.json"),
                    key: "quantization_config.config_groups.*.weights.num_bits".into(),
                    message: format!("{bits} bits for {module}: expected 1 to 8"),
                });
            }
            let scale_name = format!("{module}.weight_scale");
            let scale = tensors.take(&scale_name)?;
            let (codes, rows, cols) =
                if let Some(packed) = ints.remove(&format!("{module}.weight_packed")) {
                    let shape_name = format!("{module}.weight_shape");
                    let shape: Vec<f32> = tensors
                        .take(&shape_name)?
                        .flatten_all()
                        .and_then(|t| t.to_vec1())
                        .map_err(|e| err(&shape_name, e.to_string()))?;
                    if shape.len() != 2 {
                        return Err(err(&shape_name, format!("expected 2 dims, got {shape:?}")));
                    }
                    let (rows, cols) = (shape[0] as usize, shape[1] as usize);
                    let codes = unpack_rows(&packed, bits, rows, cols)
                        .map_err(|m| err(&format!("{module}.weight_packed"), m))?;
                    (codes, rows, cols)
                } else if let Some(w) = ints.remove(&format!("{module}.weight")) {
                    if w.shape.len() != 2 {
                        return Err(err(
                            &format!("{module}.weight"),
                            format!("expected 2 dims, got {:?}", w.shape),
                        ));
                    }
                    (w.values, w.shape[0], w.shape[1])
                } else {
                    return Err(err(
                        &format!("{module}.weight_packed"),
                        "a weight_scale without weight_packed or an int8 weight".into(),
                    ));
                };
            let scale_dims = scale.dims().to_vec();
            let scales: Vec<f32> = scale
                .flatten_all()
                .and_then(|t| t.to_vec1())
                .map_err(|e| err(&scale_name, e.to_string()))?;
            // Scales: [rows, groups], [rows, 1] or one for the tensor.
            let per_row = if scales.len() == 1 {
                1
            } else {
                scales.len() / rows.max(1)
            };
            if !(scales.len() == 1
                || (per_row > 0 && scales.len() == rows * per_row && cols % per_row == 0))
            {
                return Err(err(
                    &scale_name,
                    format!("shape {scale_dims:?} does not fit a {rows}×{cols} weight"),
                ));
            }
            let group = if scales.len() == 1 {
                cols
            } else {
                cols / per_row
            };
            let zp_name = format!("{module}.weight_zero_point");
            let zero: Option<Vec<i64>> = match ints.remove(&zp_name) {
                // Packed along the output dimension for pack-quantized group/channel scales.
                Some(z) if format == "pack-quantized" && z.values.len() != rows * per_row => {
                    Some(unpack_columns(&z, bits, rows, per_row).map_err(|m| err(&zp_name, m))?)
                }
                Some(z) => Some(z.values),
                None if !tensors.contains(&zp_name) => None,
                None => Some(tensors.take(&zp_name)?)
                    .map(|t| {
                        t.flatten_all()
                            .and_then(|t| t.to_vec1::<f32>())
                            .map(|v| v.iter().map(|&x| x as i64).collect())
                    })
                    .transpose()
                    .map_err(|e| err(&zp_name, e.to_string()))?,
            };
            if let Some(z) = &zero {
                if z.len() != 1 && z.len() != scales.len() {
                    return Err(err(
                        &zp_name,
                        format!("{} zero points for {} scales", z.len(), scales.len()),
                    ));
                }
            }
            let w: Vec<f32> = (0..rows * cols)
                .map(|k| {
                    let g = if scales.len() == 1 {
                        0
                    } else {
                        (k / cols) * per_row + (k % cols) / group
                    };
                    let z = zero
                        .as_ref()
                        .map(|z| if z.len() == 1 { z[0] } else { z[g] })
                        .unwrap_or(0);
                    (codes[k] - z) as f32 * scales[g]
                })
                .collect();
            tensors.insert(
                format!("{module}.weight"),
                Tensor::from_vec(w, (rows, cols), &Device::Cpu)
                    .map_err(|e| err(&format!("{module}.weight"), e.to_string()))?,
            );
            tensors.remove(&format!("{module}.input_scale"));
        }
    }
    for (name, t) in ints {
        let v: Vec<f32> = t.values.iter().map(|&x| x as f32).collect();
        let tensor =
            Tensor::from_vec(v, t.shape.as_slice(), &Device::Cpu).map_err(|e| IoError::Tensor {
                path: dir.to_path_buf(),
                tensor: name.clone(),
                message: e.to_string(),
            })?;
        tensors.insert(name, tensor);
    }
    Ok(())
}

/// compressed-tensors targets: a class name (`Linear`), an exact module name or `re:REGEX`; the
/// regexes supported are the `.*`-separated literal patterns llm-compressor writes.
pub fn target_matches(target: &str, module: &str) -> bool {
    match target.strip_prefix("re:") {
        None => target == "Linear" || target == module,
        Some(re) => {
            let re = re.trim_end_matches('$');
            let parts: Vec<&str> = re.split(".*").collect();
            let mut rest = module;
            for (i, part) in parts.iter().enumerate() {
                if i == 0 && !re.starts_with(".*") {
                    match rest.strip_prefix(part) {
                        Some(r) => rest = r,
                        None => return false,
                    }
                    continue;
                }
                match rest.find(part) {
                    Some(at) => rest = &rest[at + part.len()..],
                    None => return false,
                }
            }
            rest.is_empty() || re.ends_with(".*")
        }
    }
}

/// Codes packed 32/bits per int32 along each row, lowest bits first, stored offset by 2^(bits−1).
fn unpack_rows(
    packed: &IntTensor,
    bits: u32,
    rows: usize,
    cols: usize,
) -> std::result::Result<Vec<i64>, String> {
    let pf = (32 / bits) as usize;
    let per_row = cols.div_ceil(pf);
    if packed.values.len() != rows * per_row {
        return Err(format!(
            "{} int32 values for a {rows}×{cols} weight at {bits} bits (expected {})",
            packed.values.len(),
            rows * per_row
        ));
    }
    let (mask, offset) = ((1i64 << bits) - 1, 1i64 << (bits - 1));
    Ok((0..rows * cols)
        .map(|k| {
            let (r, c) = (k / cols, k % cols);
            let word = packed.values[r * per_row + c / pf] as u32 as i64;
            ((word >> (bits as usize * (c % pf))) & mask) - offset
        })
        .collect())
}

/// Zero points packed along the output dimension ([ceil(rows/pf), groups]).
fn unpack_columns(
    packed: &IntTensor,
    bits: u32,
    rows: usize,
    groups: usize,
) -> std::result::Result<Vec<i64>, String> {
    let pf = (32 / bits) as usize;
    if packed.values.len() != rows.div_ceil(pf) * groups {
        return Err(format!(
            "{} packed zero points for {rows}×{groups} groups",
            packed.values.len()
        ));
    }
    let (mask, offset) = ((1i64 << bits) - 1, 1i64 << (bits - 1));
    Ok((0..rows * groups)
        .map(|k| {
            let (r, g) = (k / groups, k % groups);
            let word = packed.values[(r / pf) * groups + g] as u32 as i64;
            ((word >> (bits as usize * (r % pf))) & mask) - offset
        })
        .collect())
}

/// Packs signed codes (in −2^(bits−1) .. 2^(bits−1)) along each row into int32 words, as
/// compressed-tensors' `pack_to_int32`.
pub fn pack_rows(codes: &[i8], bits: u32, rows: usize, cols: usize) -> Vec<i32> {
    let pf = (32 / bits) as usize;
    let per_row = cols.div_ceil(pf);
    let offset = 1i32 << (bits - 1);
    let mut out = vec![0u32; rows * per_row];
    for (k, &q) in codes.iter().enumerate() {
        let (r, c) = (k / cols, k % cols);
        let u = (q as i32 + offset) as u32 & ((1u32 << bits) - 1);
        out[r * per_row + c / pf] |= u << (bits as usize * (c % pf));
    }
    out.into_iter().map(|w| w as i32).collect()
}

#[cfg(test)]
mod tests;
