//! `inspect`: what a model file holds, read from headers only (no tensor data is loaded).

use crate::hf::{read_json, safetensors_files};
use crate::{io_error, Format, IoError, Result};
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
    let (format, architecture, file_size_bytes, mut tensors) = if path.is_dir() {
        let config = read_json(&path.join("config.json"))?;
        let arch = config
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(|a| a.as_str())
            .or_else(|| config.get("model_type").and_then(|m| m.as_str()))
            .unwrap_or("unknown")
            .to_string();
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
            // compressed-tensors: packed int32 words hold 32/bits weights each; scales, zero
            // points and shapes are overhead, not parameters.
            let packed_bits = config
                .pointer("/quantization_config/config_groups")
                .and_then(|g| g.as_object())
                .and_then(|g| g.values().next())
                .and_then(|g| g.pointer("/weights/num_bits"))
                .and_then(|b| b.as_u64());
            for (name, info) in meta.tensors() {
                let bytes = (info.data_offsets.1 - info.data_offsets.0) as u64;
                let mut t = summary(
                    name.clone(),
                    format!("{:?}", info.dtype),
                    info.shape.clone(),
                    bytes,
                );
                if let (Some(bits), true) = (packed_bits, name.ends_with(".weight_packed")) {
                    t = summary(
                        name.clone(),
                        format!("I32 (int{bits} packed)"),
                        info.shape.clone(),
                        bytes,
                    );
                    t.parameters *= 32 / bits.max(1);
                    t.bits_per_weight = bytes as f64 * 8.0 / t.parameters.max(1) as f64;
                } else if packed_bits.is_some()
                    && [
                        ".weight_scale",
                        ".weight_zero_point",
                        ".weight_shape",
                        ".input_scale",
                    ]
                    .iter()
                    .any(|s| name.ends_with(s))
                {
                    t.parameters = 0;
                    t.bits_per_weight = 0.0;
                }
                tensors.push(t);
            }
        }
        (Format::HfFolder, arch, size, tensors)
    } else {
        let mmap = crate::gguf::map(path)?;
        let content = crate::gguf::read_content(path, &mmap)?;
        let arch = content
            .metadata
            .get("general.architecture")
            .and_then(|v| v.to_string().ok().cloned())
            .unwrap_or_else(|| "unknown".into());
        let tensors = content
            .tensor_infos
            .iter()
            .map(|(name, info)| {
                let elems = info.shape.elem_count();
                let bytes = crate::gguf::tensor_bytes(info.ggml_dtype, elems).unwrap_or(0) as u64;
                summary(
                    name.clone(),
                    format!("{:?}", info.ggml_dtype),
                    info.shape.dims().to_vec(),
                    bytes,
                )
            })
            .collect();
        let size = std::fs::metadata(path).map_err(io_error(path))?.len();
        (Format::Gguf, arch, size, tensors)
    };
    tensors.sort_by_key(|a| natural_key(&a.name));
    let parameters = tensors.iter().map(|t| t.parameters).sum();
    let tensor_bytes = tensors.iter().map(|t| t.size_bytes).sum::<u64>();
    Ok(Inspection {
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
    })
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
