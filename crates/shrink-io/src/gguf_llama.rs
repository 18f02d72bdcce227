//! A checkpoint written as llama.cpp lays it out: tensor names, Q/K permutation, metadata and
//! tokenizer, planned before any data (`LlamaGguf`) and written tensor by tensor.

use crate::ggml::GgmlType;
use crate::gguf::permute_qk;
use crate::gguf_write::{GgufEntry, GgufValue, GgufWriter};
use crate::tokenizer::GgufVocab;
use crate::{Checkpoint, IoError, Result};
use candle_core::quantized::QTensor;
use candle_core::{DType, Tensor};
use shrink_models::family::{self, gpt2, llama};
use std::collections::BTreeMap;
use std::path::Path;

/// The ggml type to store a checkpoint's 2-D weights in (1-D tensors always stay F32).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufWriteType {
    F32,
    F16,
    Q8_0,
}

impl GgufWriteType {
    fn ggml(self) -> GgmlType {
        match self {
            GgufWriteType::F32 => GgmlType::F32,
            GgufWriteType::F16 => GgmlType::F16,
            GgufWriteType::Q8_0 => GgmlType::Q8_0,
        }
    }

    fn file_type(self) -> u32 {
        match self {
            GgufWriteType::F32 => 0,
            GgufWriteType::F16 => 1,
            GgufWriteType::Q8_0 => 7,
        }
    }
}

/// Values converted per slice when a float tensor is written (16M: 64 MB of f32).
const FLOAT_SLICE: usize = 1 << 24;

/// A weight already quantized into ggml blocks (row-major, Hugging Face row order), written as is.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizedBlocks {
    pub dtype: GgmlType,
    pub bytes: Vec<u8>,
}

/// Reorders whole rows of raw ggml blocks as [`permute_qk`] reorders tensor rows (HF → GGUF).
fn permute_block_rows(bytes: &[u8], rows: usize, n_head: usize) -> Vec<u8> {
    let row_bytes = bytes.len() / rows;
    let hd = rows / n_head;
    let mut out = vec![0u8; bytes.len()];
    for h in 0..n_head {
        for half in 0..2 {
            for j in 0..hd / 2 {
                let src = h * hd + half * (hd / 2) + j;
                let dst = h * hd + 2 * j + half;
                out[dst * row_bytes..(dst + 1) * row_bytes]
                    .copy_from_slice(&bytes[src * row_bytes..(src + 1) * row_bytes]);
            }
        }
    }
    out
}

/// The GGUF vocabulary of a checkpoint's tokenizer, or why it has none: checked before work
/// whose result is to be written as GGUF.
pub fn gguf_vocab_of(checkpoint: &Checkpoint) -> Result<&GgufVocab> {
    let tok = checkpoint.tokenizer()?;
    tok.gguf_vocab.as_ref().ok_or_else(|| IoError::Tokenizer {
        path: checkpoint.path.clone(),
        message: match &tok.gguf_vocab_error {
            Some(why) => format!("cannot be written as GGUF: {why}"),
            None => "cannot be written as GGUF: the tokenizer has no GGUF vocabulary".into(),
        },
    })
}

/// Writes a Llama-family or GPT-2 checkpoint as a GGUF llama.cpp loads: its metadata, the tokenizer
/// vocabulary (which must have come from a GGUF), tensors renamed and Q/K permuted. Tensors in
/// `prequantized` (by Hugging Face name) are written block for block as given, never re-rounded;
/// other 2-D tensors are stored as `weight_type`, 1-D ones as F32. One tensor is loaded (and
/// converted) at a time.
pub fn write_llama_gguf(
    checkpoint: &Checkpoint,
    path: &Path,
    weight_type: GgufWriteType,
    prequantized: &BTreeMap<String, QuantizedBlocks>,
) -> Result<()> {
    let types = prequantized
        .iter()
        .map(|(name, q)| (name.clone(), q.dtype))
        .collect();
    let layout = LlamaGguf::plan(checkpoint, path, weight_type, &types)?;
    let mut writer = GgufWriter::create(path, &layout.metadata, layout.entries.clone())?;
    for (i, name) in layout.names.iter().enumerate() {
        let data = match prequantized.get(name) {
            Some(q) => layout.blocks_data(i, q.bytes.clone())?,
            None => layout.tensor_data(i, &checkpoint.tensors.get(name)?)?,
        };
        writer.append(&layout.entries[i].name, &data)?;
    }
    writer.finish()
}

/// Gemma 3's keys beyond the Llama family's: the sliding window, each layer's attention as a
/// boolean per layer (`true`: sliding), the sliding layers' RoPE base. A final-logit soft cap is
/// refused by the config before a file is planned.
fn gemma3_metadata(checkpoint: &Checkpoint) -> Result<Vec<(String, GgufValue)>> {
    let config = shrink_models::ModelConfig::from_json(&checkpoint.config)?;
    // llama.cpp scales scores by head_dim^-0.5 (the 62-layer 27B: (hidden / heads)^-0.5).
    let theirs = match config.num_hidden_layers {
        62 => config.hidden_size / config.num_attention_heads,
        _ => config.head_dim(),
    };
    let ours = config
        .query_pre_attn_scalar
        .unwrap_or(config.head_dim() as f64);
    if ours != theirs as f64 {
        return Err(IoError::Format {
            path: checkpoint.path.clone(),
            message: format!(
                "query_pre_attn_scalar = {ours}, but llama.cpp's gemma3 scales attention by {theirs}^-0.5: the GGUF would compute another model"
            ),
        });
    }
    let mut out = vec![];
    if let Some(window) = config.sliding_window {
        out.push((
            "gemma3.attention.sliding_window".to_string(),
            GgufValue::U32(window as u32),
        ));
        out.push((
            "gemma3.attention.sliding_window_pattern".to_string(),
            GgufValue::BoolArray(
                (0..config.num_hidden_layers)
                    .map(|i| config.is_sliding_layer(i))
                    .collect(),
            ),
        ));
        out.push((
            "gemma3.rope.freq_base_swa".to_string(),
            GgufValue::F32(config.rope_local_base_freq.unwrap_or(10_000.0) as f32),
        ));
    }
    Ok(out)
}

/// A checkpoint laid out as a llama.cpp GGUF, before any data: the metadata, the tensors in
/// llama.cpp's order (embeddings, blocks, output) with their GGUF names, types and shapes, and the
/// conversion of each tensor's data (GPT-2's Conv1D transposed, Llama's Q/K rows permuted). A
/// writer appends the data of `names[i]` as `entries[i]` whenever it is ready.
#[derive(Debug, Clone)]
pub struct LlamaGguf {
    pub metadata: Vec<(String, GgufValue)>,
    pub entries: Vec<GgufEntry>,
    /// The Hugging Face name of each entry.
    pub names: Vec<String>,
    path: std::path::PathBuf,
    /// Per entry: the heads whose Q/K rows llama.cpp interleaves, and whether it is a Conv1D
    /// weight stored `[in, out]`.
    permute: Vec<Option<usize>>,
    conv1d: Vec<bool>,
    /// Per entry: what the file adds to the checkpoint's values (Gemma's norms: `1 + w`).
    shift: Vec<f32>,
}

impl LlamaGguf {
    /// The size of the file this layout makes, in bytes.
    pub fn file_size(&self) -> Result<u64> {
        crate::gguf_write::gguf_file_size(&self.path, &self.metadata, &self.entries)
    }

    /// The layout of `checkpoint` to be written to `path`, with the tensors of `quantized` (by Hugging
    /// Face name) in the given block types, other 2-D tensors as `weight_type` and 1-D ones as F32.
    pub fn plan(
        checkpoint: &Checkpoint,
        path: &Path,
        weight_type: GgufWriteType,
        quantized: &BTreeMap<String, GgmlType>,
    ) -> Result<Self> {
        let cfg = &checkpoint.config;
        let bad = |key: &str| IoError::Metadata {
            path: checkpoint.path.clone(),
            key: key.to_string(),
            message: "missing or not a number in config.json".into(),
        };
        let model_type = cfg
            .get("model_type")
            .and_then(|v| v.as_str())
            .unwrap_or("llama");
        // GPT-2's config.json names the same keys its own way.
        let gpt2 = model_type == "gpt2";
        let theirs = |key: &'static str| -> &'static str {
            match key {
                _ if !gpt2 => key,
                "intermediate_size" => "n_inner",
                _ => gpt2::CONFIG_KEYS
                    .iter()
                    .find(|(_, ours)| *ours == key)
                    .map_or(key, |(theirs, _)| theirs),
            }
        };
        let get = |key: &'static str| {
            let key = theirs(key);
            cfg.get(key)
                .and_then(|v| v.as_u64())
                .ok_or_else(|| bad(key))
        };
        let getf =
            |key: &str, default: f64| cfg.get(key).and_then(|v| v.as_f64()).unwrap_or(default);
        let Some(arch) = family::gguf_architecture_of(model_type) else {
            return Err(IoError::UnknownArchitecture {
                path: checkpoint.path.clone(),
                architecture: model_type.to_string(),
                supported: family::GGUF_SUPPORTED,
            });
        };
        // llama.cpp needs RoPE scaling as its own keys (or a frequency table): not written here,
        // so refused rather than dropped.
        if let Some(kind) = cfg.get("rope_scaling").filter(|v| !v.is_null()).map(|v| {
            v.get("rope_type")
                .or_else(|| v.get("type"))
                .and_then(|t| t.as_str())
                .unwrap_or("?")
                .to_string()
        }) {
            if kind != "default" {
                return Err(IoError::Format {
                    path: checkpoint.path.clone(),
                    message: format!(
                        "rope_scaling '{kind}' is not written to GGUF files by shrink (llama.cpp would run the model unscaled)"
                    ),
                });
            }
        }
        let n_head = get("num_attention_heads")? as usize;
        let n_head_kv = cfg
            .get("num_key_value_heads")
            .and_then(|v| v.as_u64())
            .unwrap_or(n_head as u64) as usize;
        let hidden = get("hidden_size")?;
        let head_dim = cfg
            .get("head_dim")
            .and_then(|v| v.as_u64())
            .unwrap_or(hidden / n_head as u64);
        let tok = checkpoint.tokenizer()?;
        let vocab = gguf_vocab_of(checkpoint)?;
        // GPT-2's MLP width may be left null (4 × n_embd).
        let ffn = match cfg
            .get(theirs("intermediate_size"))
            .and_then(|v| v.as_u64())
        {
            Some(v) => v,
            None if gpt2 => 4 * hidden,
            None => get("intermediate_size")?,
        };
        let a = |k: &str| format!("{arch}.{k}");
        let s = |v: &str| GgufValue::String(v.to_string());
        // The file type names the type most weights have.
        let mut counts: BTreeMap<u32, usize> = BTreeMap::new();
        for dtype in quantized.values() {
            *counts.entry(GgmlType::file_type(*dtype)).or_default() += 1;
        }
        let file_type = counts
            .iter()
            .max_by_key(|(_, n)| **n)
            .map(|(t, _)| *t)
            .unwrap_or(weight_type.file_type());
        let mut metadata = vec![
            ("general.architecture".to_string(), s(arch)),
            (
                "general.name".to_string(),
                s(cfg
                    .get("_name_or_path")
                    .and_then(|v| v.as_str())
                    .unwrap_or("shrink")),
            ),
            ("general.file_type".to_string(), GgufValue::U32(file_type)),
            (
                "general.quantization_version".to_string(),
                GgufValue::U32(2),
            ),
            (
                a("context_length"),
                GgufValue::U32(
                    cfg.get(theirs("max_position_embeddings"))
                        .and_then(|v| v.as_u64())
                        .unwrap_or(2048) as u32,
                ),
            ),
            (a("embedding_length"), GgufValue::U32(hidden as u32)),
            (
                a("block_count"),
                GgufValue::U32(get("num_hidden_layers")? as u32),
            ),
            (a("feed_forward_length"), GgufValue::U32(ffn as u32)),
            (a("attention.head_count"), GgufValue::U32(n_head as u32)),
            (
                a("attention.head_count_kv"),
                GgufValue::U32(n_head_kv as u32),
            ),
            (a("vocab_size"), GgufValue::U32(get("vocab_size")? as u32)),
            ("tokenizer.ggml.model".to_string(), s(&vocab.model)),
        ];
        if gpt2 {
            metadata.push((
                a("attention.layer_norm_epsilon"),
                GgufValue::F32(getf("layer_norm_epsilon", 1e-5) as f32),
            ));
        } else {
            metadata.extend([
                (a("attention.key_length"), GgufValue::U32(head_dim as u32)),
                (a("attention.value_length"), GgufValue::U32(head_dim as u32)),
                (
                    a("rope.freq_base"),
                    GgufValue::F32(getf("rope_theta", 10_000.0) as f32),
                ),
                (
                    a("attention.layer_norm_rms_epsilon"),
                    GgufValue::F32(getf("rms_norm_eps", 1e-6) as f32),
                ),
                (a("rope.dimension_count"), GgufValue::U32(head_dim as u32)),
            ]);
        }
        if model_type == "gemma3_text" {
            metadata.extend(gemma3_metadata(checkpoint)?);
        }
        if let Some(pre) = &vocab.pre {
            metadata.push(("tokenizer.ggml.pre".into(), s(pre)));
        }
        metadata.push((
            "tokenizer.ggml.tokens".into(),
            GgufValue::StringArray(vocab.tokens.clone()),
        ));
        if !vocab.scores.is_empty() {
            metadata.push((
                "tokenizer.ggml.scores".into(),
                GgufValue::F32Array(vocab.scores.clone()),
            ));
        }
        metadata.push((
            "tokenizer.ggml.token_type".into(),
            GgufValue::I32Array(vocab.token_types.clone()),
        ));
        if !vocab.merges.is_empty() || vocab.model == "gpt2" {
            metadata.push((
                "tokenizer.ggml.merges".into(),
                GgufValue::StringArray(vocab.merges.clone()),
            ));
        }
        if let Some(bos) = tok.bos_token_id {
            metadata.push(("tokenizer.ggml.bos_token_id".into(), GgufValue::U32(bos)));
        }
        if let Some(eos) = tok.eos_token_ids.first() {
            metadata.push(("tokenizer.ggml.eos_token_id".into(), GgufValue::U32(*eos)));
        }
        for (key, id) in [
            ("tokenizer.ggml.unknown_token_id", vocab.unknown_token_id),
            ("tokenizer.ggml.padding_token_id", vocab.padding_token_id),
        ] {
            if let Some(id) = id {
                metadata.push((key.into(), GgufValue::U32(id)));
            }
        }
        metadata.push((
            "tokenizer.ggml.add_bos_token".into(),
            GgufValue::Bool(tok.add_bos),
        ));
        metadata.push((
            "tokenizer.ggml.add_space_prefix".into(),
            GgufValue::Bool(vocab.add_space_prefix),
        ));
        if let Some(t) = &tok.chat_template {
            metadata.push(("tokenizer.chat_template".into(), s(t)));
        }

        // Tensors in llama.cpp's conventional order: embeddings, blocks, output.
        let mut ordered: Vec<&String> = checkpoint.tensors.names().collect();
        let names = family::gguf_names_of(arch).unwrap_or(&llama::GGUF);
        let gguf_name = |n: &str| names.to_gguf(n);
        let layer_of = |n: &str| -> (usize, usize) {
            let g = gguf_name(n).map(|(g, _)| g).unwrap_or_default();
            match g
                .strip_prefix("blk.")
                .and_then(|r| r.split('.').next()?.parse().ok())
            {
                Some(l) => (1, l),
                None if g == "token_embd.weight" || g == "position_embd.weight" => (0, 0),
                None => (2, 0),
            }
        };
        ordered.sort_by_cached_key(|name| (layer_of(name), (*name).clone()));
        let mut layout = LlamaGguf {
            metadata,
            entries: Vec::with_capacity(ordered.len()),
            names: Vec::with_capacity(ordered.len()),
            path: path.to_path_buf(),
            permute: Vec::with_capacity(ordered.len()),
            conv1d: Vec::with_capacity(ordered.len()),
            shift: Vec::with_capacity(ordered.len()),
        };
        for name in ordered {
            let err = |message: String| IoError::Tensor {
                path: path.to_path_buf(),
                tensor: name.clone(),
                message,
            };
            let (gname, conv1d) =
                gguf_name(name).ok_or_else(|| err("no GGUF name for this tensor".into()))?;
            let mut dims = checkpoint
                .tensors
                .shape(name)
                .ok_or_else(|| err("missing".into()))?
                .to_vec();
            // GGUF rows are output channels: GPT-2's Conv1D `[in, out]` weights are transposed.
            if conv1d {
                dims.reverse();
            }
            let dtype = match quantized.get(name.as_str()) {
                Some(&dtype) => {
                    if dims.len() != 2 || !dims[1].is_multiple_of(dtype.block_size()) {
                        return Err(err(format!(
                            "{dtype:?} blocks do not fit a tensor of shape {dims:?}"
                        )));
                    }
                    dtype
                }
                None => {
                    let row = *dims.last().unwrap_or(&0);
                    if dims.len() == 2 && row % weight_type.ggml().block_size() == 0 {
                        weight_type.ggml()
                    } else {
                        GgmlType::F32
                    }
                }
            };
            let permute = match () {
                _ if arch != "llama" => None,
                _ if name.contains("self_attn.q_proj") => Some(n_head),
                _ if name.contains("self_attn.k_proj") => Some(n_head_kv),
                _ => None,
            };
            layout.entries.push(GgufEntry {
                name: gname,
                dtype,
                dims,
            });
            layout.names.push(name.clone());
            layout.permute.push(permute);
            layout.conv1d.push(conv1d);
            layout.shift.push(names.shift_of(name));
        }
        Ok(layout)
    }

    fn error(&self, i: usize, message: String) -> IoError {
        IoError::Tensor {
            path: self.path.clone(),
            tensor: self.names[i].clone(),
            message,
        }
    }

    /// The data of entry `i` from ggml blocks of its type in Hugging Face row order.
    pub fn blocks_data(&self, i: usize, bytes: Vec<u8>) -> Result<Vec<u8>> {
        let entry = &self.entries[i];
        if entry.bytes() != Some(bytes.len()) {
            return Err(self.error(
                i,
                format!(
                    "{} bytes of {:?} blocks do not fit a {:?} tensor",
                    bytes.len(),
                    entry.dtype,
                    entry.dims
                ),
            ));
        }
        Ok(match self.permute[i] {
            Some(heads) => permute_block_rows(&bytes, entry.dims[0], heads),
            None => bytes,
        })
    }

    /// The data of entry `i` from its tensor (Hugging Face layout), converted to its type. Float
    /// types are converted a slice of rows at a time into the output, so that a large embedding
    /// never exists in f32 beside its stored copy and its output.
    pub fn tensor_data(&self, i: usize, t: &Tensor) -> Result<Vec<u8>> {
        let err = |e: candle_core::Error| self.error(i, e.to_string());
        let mut t = if self.conv1d[i] {
            t.t().and_then(|t| t.contiguous()).map_err(err)?
        } else {
            t.clone()
        };
        if let Some(heads) = self.permute[i] {
            t = t.to_dtype(DType::F32).map_err(err)?;
            t = permute_qk(&t, heads, false).map_err(err)?;
        }
        if self.shift[i] != 0.0 {
            t = t.to_dtype(DType::F32).map_err(err)?;
            t = t.affine(1.0, self.shift[i] as f64).map_err(err)?;
        }
        let entry = &self.entries[i];
        if t.dims() != entry.dims.as_slice() {
            return Err(self.error(
                i,
                format!(
                    "shape {:?}, but the layout holds {:?}",
                    t.dims(),
                    entry.dims
                ),
            ));
        }
        let float = match entry.dtype {
            GgmlType::F32 => Some(DType::F32),
            GgmlType::F16 => Some(DType::F16),
            _ => None,
        };
        let Some(dtype) = float else {
            let t = t.to_dtype(DType::F32).map_err(err)?;
            let candle = crate::ggml::to_candle(entry.dtype).ok_or_else(|| {
                self.error(
                    i,
                    format!(
                        "{:?} blocks are written from quantized weights only",
                        entry.dtype
                    ),
                )
            })?;
            let q = QTensor::quantize(&t, candle).map_err(err)?;
            return q.data().map(|d| d.to_vec()).map_err(err);
        };
        let flat = t.flatten_all().map_err(err)?;
        let len = flat.elem_count();
        let mut out = Vec::with_capacity(len * dtype.size_in_bytes());
        for start in (0..len).step_by(FLOAT_SLICE) {
            let slice = flat
                .narrow(0, start, FLOAT_SLICE.min(len - start))
                .and_then(|s| s.to_dtype(DType::F32))
                .and_then(|s| s.to_dtype(dtype))
                .map_err(err)?;
            match dtype {
                DType::F16 => {
                    for v in slice.to_vec1::<half::f16>().map_err(err)? {
                        out.extend_from_slice(&v.to_le_bytes());
                    }
                }
                _ => {
                    for v in slice.to_vec1::<f32>().map_err(err)? {
                        out.extend_from_slice(&v.to_le_bytes());
                    }
                }
            }
        }
        Ok(out)
    }
}
