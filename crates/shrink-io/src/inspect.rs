//! `inspect`: what a model file holds, read from headers only (no tensor data is loaded).

use crate::hf::{read_json, safetensors_files};
use crate::{Format, IoError, Result};
use serde::Serialize;
use std::path::Path;

/// One tensor as stored on disk.
#[derive(Debug, Clone, Serialize)]
pub struct TensorSummary {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<usize>,
    pub parameters: u64,
    pub size_bytes: u64,
    pub bits_per_weight: f64,
}

/// A model file's summary.
#[derive(Debug, Clone, Serialize)]
pub struct Inspection {
    pub path: String,
    pub format: Format,
    pub architecture: String,
    pub file_size_bytes: u64,
    pub parameters: u64,
    pub tensor_bytes: u64,
    /// Tensor storage bits per parameter (metadata and tokenizer excluded).
    pub bits_per_weight: f64,
    pub tensors: Vec<TensorSummary>,
}

fn summary(name: String, dtype: String, shape: Vec<usize>, size_bytes: u64) -> TensorSummary {
    let parameters: u64 = shape.iter().map(|&d| d as u64).product();
    TensorSummary {
        bits_per_weight: if parameters == 0 {
            0.0
        } else {
            size_bytes as f64 * 8.0 / parameters as f64
        },
        name,
        dtype,
        shape,
        parameters,
        size_bytes,
    }
}

/// Summarises a GGUF file or a Hugging Face folder.
pub fn inspect(path: &Path) -> Result<Inspection> {
    if !path.exists() {
        return Err(IoError::NotFound {
            path: path.to_path_buf(),
        });
    }
    if path.is_dir() {
        let config = read_json(&path.join("config.json"))?;
        let mut tensors = Vec::new();
        let mut size = 0;
        for file in safetensors_files(path)? {
            let mmap = crate::gguf::map(&file)?;
            size += mmap.len() as u64;
            let (_, meta) =
                safetensors::SafeTensors::read_metadata(&mmap).map_err(|e| IoError::Format {
                    path: file.clone(),
                    message: format!("corrupt or truncated safetensors header: {e}"),
                })?;
            for (name, info) in meta.tensors() {
                tensors.push(stored(
                    name.clone(),
                    info.dtype,
                    info.shape.clone(),
                    info.data_offsets.1 - info.data_offsets.0,
                ));
            }
        }
        Ok(of_hf(path, &config, size, tensors))
    } else {
        let mmap = crate::gguf::map(path)?;
        let content = crate::gguf::read_content(path, &mmap)?;
        Ok(of_gguf(path, &content, mmap.len() as u64))
    }
}

/// A safetensors tensor as stored.
pub(crate) fn stored(
    name: String,
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    bytes: usize,
) -> TensorSummary {
    summary(name, format!("{dtype:?}"), shape, bytes as u64)
}

/// The inspection of a Hugging Face folder of `size` bytes of safetensors holding `tensors` (as
/// [`stored`] them).
pub(crate) fn of_hf(
    path: &Path,
    config: &serde_json::Value,
    size: u64,
    mut tensors: Vec<TensorSummary>,
) -> Inspection {
    let arch = config
        .get("architectures")
        .and_then(|a| a.get(0))
        .and_then(|a| a.as_str())
        .or_else(|| config.get("model_type").and_then(|m| m.as_str()))
        .unwrap_or("unknown")
        .to_string();
    // compressed-tensors: packed int32 words hold 32/bits weights each; scales, zero points and
    // shapes are overhead, not parameters.
    let packed_bits = config
        .pointer("/quantization_config/config_groups")
        .and_then(|g| g.as_object())
        .and_then(|g| g.values().next())
        .and_then(|g| g.pointer("/weights/num_bits"))
        .and_then(|b| b.as_u64());
    if let Some(bits) = packed_bits {
        for t in &mut tensors {
            if t.name.ends_with(".weight_packed") {
                t.dtype = format!("I32 (int{bits} packed)");
                t.parameters *= 32 / bits.max(1);
                t.bits_per_weight = t.size_bytes as f64 * 8.0 / t.parameters.max(1) as f64;
            } else if [
                ".weight_scale",
                ".weight_zero_point",
                ".weight_shape",
                ".input_scale",
            ]
            .iter()
            .any(|s| t.name.ends_with(s))
            {
                t.parameters = 0;
                t.bits_per_weight = 0.0;
            }
        }
    }
    finish(path, Format::HfFolder, arch, size, tensors)
}

/// The inspection of a GGUF file of `size` bytes whose header is `content`.
pub(crate) fn of_gguf(path: &Path, content: &crate::GgufLayout, size: u64) -> Inspection {
    let arch = content
        .metadata
        .get("general.architecture")
        .and_then(|v| v.to_string().ok().cloned())
        .unwrap_or_else(|| "unknown".into());
    let tensors = content
        .tensors
        .iter()
        .map(|t| {
            let shape = t.dims.iter().rev().map(|&d| d as usize).collect();
            summary(
                t.name.clone(),
                format!("{:?}", t.dtype),
                shape,
                t.size_bytes,
            )
        })
        .collect();
    finish(path, Format::Gguf, arch, size, tensors)
}

fn finish(
    path: &Path,
    format: Format,
    architecture: String,
    file_size_bytes: u64,
    mut tensors: Vec<TensorSummary>,
) -> Inspection {
    tensors.sort_by_key(|a| natural_key(&a.name));
    let parameters = tensors.iter().map(|t| t.parameters).sum();
    let tensor_bytes = tensors.iter().map(|t| t.size_bytes).sum::<u64>();
    Inspection {
        path: path.display().to_string(),
        format,
        architecture,
        file_size_bytes,
        parameters,
        tensor_bytes,
        bits_per_weight: if parameters == 0 {
            0.0
        } else {
            tensor_bytes as f64 * 8.0 / parameters as f64
        },
        tensors,
    }
}

/// Sorts `blk.2` before `blk.10`.
fn natural_key(name: &str) -> Vec<(String, u64)> {
    name.split('.')
        .map(|part| match part.parse::<u64>() {
            Ok(n) => (String::new(), n),
            Err(_) => (part.to_string(), 0),
        })
        .collect()
}
