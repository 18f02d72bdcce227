//! GGUF: read (memory-mapped; dequantize every type candle knows; undo llama.cpp's Q/K permutation;
//! rebuild config and tokenizer from metadata). Writing: `gguf_write` (the format) and
//! `gguf_llama` (a checkpoint in llama.cpp's layout).

use crate::ggml::GgmlType;
use crate::gguf_layout::GgufLayout;
use crate::tokenizer::{GgufVocab, TokenizerBundle};
use crate::{io_error, Checkpoint, Format, IoError, Result};
use candle_core::quantized::gguf_file::Value;
use candle_core::{DType, Device, Tensor};
use serde_json::json;
use shrink_core::qmatmul::{BlockType, QMatrix};
use shrink_models::family::{self, llama};
use std::path::Path;

/// Memory-maps a GGUF file; the mapping is read once, tensor by tensor.
pub(crate) fn map(path: &Path) -> Result<memmap2::Mmap> {
    let file = std::fs::File::open(path).map_err(io_error(path))?;
    // SAFETY: the file is opened read-only; shrink never writes to its inputs. As with every mmap,
    // a concurrent writer from another process could change the bytes under us.
    unsafe { memmap2::Mmap::map(&file) }.map_err(io_error(path))
}

/// Lets the kernel take back the pages of `range` of a read-only map once its bytes were copied
/// out: they stay in the page cache but leave this process's resident set, so reading a model
/// tensor by tensor never keeps the whole file resident. Only an optimisation: errors are ignored.
pub(crate) fn release(mmap: &memmap2::Mmap, range: std::ops::Range<usize>) {
    #[cfg(unix)]
    {
        let page = 4096;
        let start = range.start / page * page;
        let end = range.end.min(mmap.len());
        if end > start {
            // SAFETY: the map is read-only and backed by a file; MADV_DONTNEED only drops this
            // process's copies of the pages, which are read again from the file if touched.
            // No reference into the range is alive: the caller has copied its bytes.
            let _ = unsafe {
                mmap.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start)
            };
        }
    }
    #[cfg(not(unix))]
    let _ = (mmap, range);
}

/// Reads the header, metadata and tensor table, checking the file's layout
/// ([`crate::check_gguf_layout`]).
pub(crate) fn read_content(path: &Path, bytes: &[u8]) -> Result<GgufLayout> {
    crate::gguf_layout::check_gguf_layout(path, bytes)
}

/// The float type a GGUF tensor type holds its values in, read as they are; `None` for block
/// types, which are dequantized to f32.
fn float_dtype(dtype: GgmlType) -> Option<DType> {
    match dtype {
        GgmlType::F32 => Some(DType::F32),
        GgmlType::F16 => Some(DType::F16),
        GgmlType::BF16 => Some(DType::BF16),
        _ => None,
    }
}

fn meta<'a>(content: &'a GgufLayout, key: &str) -> Option<&'a Value> {
    content.metadata.get(key)
}

fn meta_err(path: &Path, key: &str, message: impl Into<String>) -> IoError {
    IoError::Metadata {
        path: path.to_path_buf(),
        key: key.to_string(),
        message: message.into(),
    }
}

fn meta_u64(path: &Path, content: &GgufLayout, key: &str) -> Result<Option<u64>> {
    match meta(content, key) {
        None => Ok(None),
        Some(v) => v
            .to_u64()
            .or_else(|_| v.to_u32().map(u64::from))
            .or_else(|_| v.to_i32().map(|x| x as u64))
            .map(Some)
            .map_err(|_| {
                meta_err(
                    path,
                    key,
                    format!("expected an integer, found {:?}", v.value_type()),
                )
            }),
    }
}

fn meta_req_u64(path: &Path, content: &GgufLayout, key: &str) -> Result<u64> {
    meta_u64(path, content, key)?.ok_or_else(|| meta_err(path, key, "missing"))
}

fn meta_f64(path: &Path, content: &GgufLayout, key: &str) -> Result<Option<f64>> {
    match meta(content, key) {
        None => Ok(None),
        Some(v) => v
            .to_f32()
            .map(f64::from)
            .or_else(|_| v.to_f64())
            .map(Some)
            .map_err(|_| meta_err(path, key, "expected a float")),
    }
}

fn meta_str<'a>(path: &Path, content: &'a GgufLayout, key: &str) -> Result<Option<&'a str>> {
    match meta(content, key) {
        None => Ok(None),
        Some(v) => v
            .to_string()
            .map(|s| Some(s.as_str()))
            .map_err(|_| meta_err(path, key, "expected a string")),
    }
}

fn meta_bool(content: &GgufLayout, key: &str) -> Option<bool> {
    meta(content, key).and_then(|v| v.to_bool().ok())
}

fn meta_array<'a>(path: &Path, content: &'a GgufLayout, key: &str) -> Result<&'a Vec<Value>> {
    meta(content, key)
        .ok_or_else(|| meta_err(path, key, "missing"))?
        .to_vec()
        .map_err(|_| meta_err(path, key, "expected an array"))
}

/// Gemma 3's keys of the config read from a GGUF file: GeGLU, the sliding window (all but every
/// 6th layer, or `attention.sliding_window_pattern`), the local RoPE base (`rope.freq_base_swa`,
/// llama.cpp's default 10,000) and the score scale llama.cpp uses (`head_dim^-0.5`; the 27B's
/// `(hidden / heads)^-0.5`). A final-logit soft cap is carried into the config, which refuses it.
fn gemma3_config(
    path: &Path,
    content: &GgufLayout,
    config: &mut serde_json::Value,
    (n_layer, hidden, n_head, head_dim): (usize, usize, usize, usize),
) -> Result<()> {
    let a = |k: &str| format!("gemma3.{k}");
    let map = config.as_object_mut().expect("a JSON object");
    map.remove("hidden_act");
    map.insert("hidden_activation".into(), json!("gelu_pytorch_tanh"));
    let scalar = if n_layer == 62 {
        hidden / n_head
    } else {
        head_dim
    };
    map.insert("query_pre_attn_scalar".into(), json!(scalar));
    if let Some(window) = meta_u64(path, content, &a("attention.sliding_window"))? {
        map.insert("sliding_window".into(), json!(window));
        let local = meta_f64(path, content, &a("rope.freq_base_swa"))?.unwrap_or(10_000.0);
        map.insert("rope_local_base_freq".into(), json!(local));
        let key = a("attention.sliding_window_pattern");
        match meta(content, &key) {
            // Absent: the config's default (every 6th layer global), as llama.cpp's.
            None => {}
            // A flag per layer (llama.cpp writes booleans or 0/1 integers).
            Some(Value::Array(flags)) => {
                let types = flags
                    .iter()
                    .map(
                        |f| match f.to_bool().or_else(|_| f.to_u32().map(|v| v != 0)) {
                            Ok(true) => Ok("sliding_attention"),
                            Ok(false) => Ok("full_attention"),
                            Err(_) => Err(meta_err(path, &key, "expected a boolean per layer")),
                        },
                    )
                    .collect::<Result<Vec<_>>>()?;
                map.insert("layer_types".into(), json!(types));
            }
            // Every `every`-th layer global; 0: every layer sliding (llama.cpp's reading).
            Some(_) => match meta_u64(path, content, &key)?.unwrap_or(6) {
                0 => {
                    map.insert(
                        "layer_types".into(),
                        json!(vec!["sliding_attention"; n_layer]),
                    );
                }
                every => {
                    map.insert("sliding_window_pattern".into(), json!(every));
                }
            },
        }
    }
    if let Some(cap) = meta_f64(path, content, &a("final_logit_softcapping"))? {
        map.insert("final_logit_softcapping".into(), json!(cap));
    }
    Ok(())
}

/// The GGUF name for a Hugging Face tensor name (llama layout), or `None` if unknown.
pub fn hf_to_gguf_name(name: &str) -> Option<String> {
    llama::GGUF.to_gguf(name).map(|(g, _)| g)
}

/// llama.cpp's `llama` architecture stores Q/K rows with RoPE pairs interleaved: HF row
/// `h*hd + half*hd/2 + j` is GGUF row `h*hd + 2*j + half`. `to_hf` selects the direction.
pub(crate) fn permute_qk(t: &Tensor, n_head: usize, to_hf: bool) -> candle_core::Result<Tensor> {
    let dims = t.dims().to_vec();
    let rows = dims[0];
    let cols: usize = dims[1..].iter().product();
    let hd = rows / n_head;
    let split = if to_hf {
        (n_head, hd / 2, 2, cols)
    } else {
        (n_head, 2, hd / 2, cols)
    };
    t.reshape(split)?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)
}

/// The block type of `dtype` if shrink computes its products with integer dot products.
fn block_type(dtype: GgmlType) -> Option<BlockType> {
    BlockType::from_ggml(dtype.id())
}

/// Reads a `rows × cols` matrix's blocks at `start` of the map, its rows put in Hugging Face's
/// order for Q and K (llama.cpp permutes them: the permutation is found by permuting row
/// indices).
fn packed_reader(
    path: &Path,
    mmap: &std::sync::Arc<memmap2::Mmap>,
    gguf_name: &str,
    ty: BlockType,
    (rows, cols): (usize, usize),
    start: usize,
    heads: Option<usize>,
) -> std::sync::Arc<crate::tensors::PackedFn> {
    let (path, mmap, gguf_name) = (path.to_path_buf(), mmap.clone(), gguf_name.to_string());
    std::sync::Arc::new(move || {
        let tensor_err = |message: String| IoError::Tensor {
            path: path.clone(),
            tensor: gguf_name.clone(),
            message,
        };
        let len = (rows * cols)
            .checked_div(ty.block_len())
            .map(|blocks| blocks * ty.block_bytes())
            .unwrap_or(0);
        let data = mmap
            .get(start..start + len)
            .ok_or_else(|| tensor_err("its data lies outside the file".into()))?;
        let m =
            QMatrix::new(ty, rows, cols, data.to_vec()).map_err(|e| tensor_err(e.to_string()))?;
        release(&mmap, start..start + len);
        let Some(heads) = heads else { return Ok(m) };
        let index: Vec<f32> = (0..rows).map(|r| r as f32).collect();
        let order = Tensor::from_vec(index, (rows, 1), &Device::Cpu)
            .and_then(|t| permute_qk(&t, heads, true))
            .and_then(|t| t.flatten_all()?.to_vec1::<f32>())
            .map_err(|e| tensor_err(e.to_string()))?;
        let order: Vec<usize> = order.into_iter().map(|r| r as usize).collect();
        Ok(m.permute_rows(&order))
    })
}

/// The checkpoint of a mapped GGUF file whose header `content` is already read.
pub(crate) fn checkpoint_of(
    path: &Path,
    mmap: &std::sync::Arc<memmap2::Mmap>,
    content: &GgufLayout,
) -> Result<Checkpoint> {
    let arch = meta_str(path, content, "general.architecture")?
        .ok_or_else(|| meta_err(path, "general.architecture", "missing"))?
        .to_string();
    let Some(model_type) = family::model_type_of_gguf(&arch) else {
        return Err(IoError::UnknownArchitecture {
            path: path.to_path_buf(),
            architecture: arch,
            supported: family::GGUF_SUPPORTED,
        });
    };
    let names = family::gguf_names_of(&arch).unwrap_or(&llama::GGUF);
    let a = |k: &str| format!("{arch}.{k}");
    let n_head = meta_req_u64(path, content, &a("attention.head_count"))? as usize;
    let n_head_kv =
        meta_u64(path, content, &a("attention.head_count_kv"))?.unwrap_or(n_head as u64) as usize;
    let hidden = meta_req_u64(path, content, &a("embedding_length"))? as usize;
    let n_layer = meta_req_u64(path, content, &a("block_count"))? as usize;
    let ffn = meta_req_u64(path, content, &a("feed_forward_length"))? as usize;
    if n_head == 0 || n_head_kv == 0 {
        return Err(meta_err(
            path,
            &a("attention.head_count"),
            "must be positive",
        ));
    }
    let head_dim = meta_u64(path, content, &a("attention.key_length"))?
        .map(|v| v as usize)
        .unwrap_or(hidden / n_head);
    if let Some(rot) = meta_u64(path, content, &a("rope.dimension_count"))? {
        if rot as usize != head_dim {
            return Err(meta_err(
                path,
                &a("rope.dimension_count"),
                format!("partial rotary embeddings ({rot} of {head_dim}) are not supported"),
            ));
        }
    }
    let eps_key = if arch == "gpt2" {
        a("attention.layer_norm_epsilon")
    } else {
        a("attention.layer_norm_rms_epsilon")
    };
    let eps =
        meta_f64(path, content, &eps_key)?.ok_or_else(|| meta_err(path, &eps_key, "missing"))?;
    let theta = meta_f64(path, content, &a("rope.freq_base"))?.unwrap_or(10_000.0);
    if let Some(kind) = meta_str(path, content, &a("rope.scaling.type"))? {
        if kind != "none" {
            return Err(meta_err(
                path,
                &a("rope.scaling.type"),
                format!("RoPE scaling '{kind}' is not supported when reading GGUF files"),
            ));
        }
    }
    let ctx_len = meta_u64(path, content, &a("context_length"))?.unwrap_or(2048);

    // Tokenizer.
    let tokens: Vec<String> = meta_array(path, content, "tokenizer.ggml.tokens")?
        .iter()
        .map(|v| v.to_string().cloned())
        .collect::<candle_core::Result<_>>()
        .map_err(|_| meta_err(path, "tokenizer.ggml.tokens", "expected strings"))?;
    let token_types: Vec<i32> = match meta(content, "tokenizer.ggml.token_type") {
        Some(_) => meta_array(path, content, "tokenizer.ggml.token_type")?
            .iter()
            .map(|v| v.to_i32())
            .collect::<candle_core::Result<_>>()
            .map_err(|_| meta_err(path, "tokenizer.ggml.token_type", "expected i32 values"))?,
        None => vec![1; tokens.len()],
    };
    let merges: Vec<String> = match meta(content, "tokenizer.ggml.merges") {
        Some(_) => meta_array(path, content, "tokenizer.ggml.merges")?
            .iter()
            .map(|v| v.to_string().cloned())
            .collect::<candle_core::Result<_>>()
            .map_err(|_| meta_err(path, "tokenizer.ggml.merges", "expected strings"))?,
        None => vec![],
    };
    let scores: Vec<f32> = match meta(content, "tokenizer.ggml.scores") {
        Some(_) => meta_array(path, content, "tokenizer.ggml.scores")?
            .iter()
            .map(|v| v.to_f32())
            .collect::<candle_core::Result<_>>()
            .map_err(|_| meta_err(path, "tokenizer.ggml.scores", "expected f32 values"))?,
        None => vec![],
    };
    let model = meta_str(path, content, "tokenizer.ggml.model")?
        .ok_or_else(|| meta_err(path, "tokenizer.ggml.model", "missing"))?
        .to_string();
    // llama.cpp's defaults when the keys are absent: SentencePiece vocabularies put a space
    // before the text and a BOS token before that.
    let spm = model == "llama";
    let vocab = GgufVocab {
        add_space_prefix: meta_bool(content, "tokenizer.ggml.add_space_prefix").unwrap_or(spm),
        scores,
        model,
        pre: meta_str(path, content, "tokenizer.ggml.pre")?.map(str::to_string),
        tokens,
        token_types,
        merges,
        unknown_token_id: meta_u64(path, content, "tokenizer.ggml.unknown_token_id")?
            .map(|v| v as u32),
        padding_token_id: meta_u64(path, content, "tokenizer.ggml.padding_token_id")?
            .map(|v| v as u32),
    };
    let vocab_size = meta_u64(path, content, &a("vocab_size"))?
        .map(|v| v as usize)
        .unwrap_or(vocab.tokens.len());
    let bos = meta_u64(path, content, "tokenizer.ggml.bos_token_id")?.map(|v| v as u32);
    let eos = meta_u64(path, content, "tokenizer.ggml.eos_token_id")?.map(|v| v as u32);
    let add_bos = meta_bool(content, "tokenizer.ggml.add_bos_token").unwrap_or(spm);
    let chat_template = meta_str(path, content, "tokenizer.chat_template")?.map(str::to_string);
    let tokenizer =
        TokenizerBundle::from_gguf_vocab(path, vocab, bos, eos, add_bos, chat_template)?;

    // Tensors under HF names, each dequantized from the map when it is loaded.
    let mut tensors = crate::Tensors::empty(path.to_path_buf());
    for info in &content.tensors {
        let name = &info.name;
        let tensor_err = |message: String| IoError::Tensor {
            path: path.to_path_buf(),
            tensor: name.clone(),
            message,
        };
        if name == "rope_freqs.weight" {
            continue; // a precomputed RoPE table; the model computes its own
        }
        let (hf, conv1d) = names.to_hf(name).ok_or_else(|| {
            tensor_err(format!("unknown tensor name for the {arch} architecture"))
        })?;
        let shift = names.shift_of(&hf);
        let heads = match () {
            _ if arch != "llama" => None,
            _ if hf.contains("self_attn.q_proj") => Some(n_head),
            _ if hf.contains("self_attn.k_proj") => Some(n_head_kv),
            _ => None,
        };
        // ggml's dimensions run fastest first; a tensor's shape is the reverse.
        let stored_shape: Vec<usize> = info.dims.iter().rev().map(|&d| d as usize).collect();
        let mut shape = stored_shape.clone();
        if conv1d {
            shape.reverse();
        }
        let start = (content.data_offset + info.offset) as usize;
        let packed = match (block_type(info.dtype), shape.as_slice(), conv1d) {
            (Some(ty), &[rows, cols], false) => Some(packed_reader(
                path,
                mmap,
                name,
                ty,
                (rows, cols),
                start,
                heads,
            )),
            _ => None,
        };
        let (ggml_type, bytes) = (info.dtype, info.size_bytes as usize);
        let (mmap, path, gguf_name) = (mmap.clone(), path.to_path_buf(), name.clone());
        let load = move |dtype: DType| -> Result<Tensor> {
            let tensor_err = |message: String| IoError::Tensor {
                path: path.clone(),
                tensor: gguf_name.clone(),
                message,
            };
            let data = mmap
                .get(start..start + bytes)
                .ok_or_else(|| tensor_err("its data lies outside the file".into()))?;
            // Float tensors are copied from the file in their own type (an f16 matrix is not
            // widened to f32 on the way); blocks are dequantized to f32.
            let mut t = match float_dtype(ggml_type) {
                Some(float) => {
                    let stored = match float {
                        DType::F16 => safetensors::Dtype::F16,
                        DType::BF16 => safetensors::Dtype::BF16,
                        _ => safetensors::Dtype::F32,
                    };
                    crate::hf::tensor_from_map(&mmap, start..start + bytes, stored, &stored_shape)
                        .map_err(|e| tensor_err(e.to_string()))?
                }
                None => crate::ggml::dequantize(ggml_type, data, &stored_shape)
                    .map_err(|e| tensor_err(format!("cannot dequantize {ggml_type:?}: {e}")))?,
            };
            release(&mmap, start..start + bytes);
            if let Some(heads) = heads {
                t = permute_qk(&t, heads, true).map_err(|e| tensor_err(e.to_string()))?;
            }
            if conv1d {
                t = t
                    .t()
                    .and_then(|t| t.contiguous())
                    .map_err(|e| tensor_err(e.to_string()))?;
            }
            if shift != 0.0 {
                // In f32: `1 + w` read back as `w` (exact for scales of at least one half).
                t = t
                    .to_dtype(DType::F32)
                    .and_then(|t| t.affine(1.0, -shift as f64))
                    .map_err(|e| tensor_err(e.to_string()))?;
            }
            t.to_dtype(dtype).map_err(|e| tensor_err(e.to_string()))
        };
        let stored = float_dtype(ggml_type).unwrap_or(DType::F32);
        tensors.insert_stored(hf.clone(), shape, stored, std::sync::Arc::new(load))?;
        if let Some(read) = packed {
            tensors.set_packed(&hf, read)?;
        }
    }
    let tie = !tensors.contains("lm_head.weight");
    let config = if arch == "gpt2" {
        json!({
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "n_embd": hidden,
            "n_inner": ffn,
            "n_layer": n_layer,
            "n_head": n_head,
            "n_positions": ctx_len,
            "layer_norm_epsilon": eps,
            "activation_function": "gelu_new",
            "vocab_size": vocab_size,
            "bos_token_id": bos,
            "eos_token_id": eos,
            "torch_dtype": "float32",
        })
    } else {
        let class = match model_type {
            "qwen2" => "Qwen2ForCausalLM",
            "qwen3" => "Qwen3ForCausalLM",
            "gemma3_text" => "Gemma3ForCausalLM",
            _ => "LlamaForCausalLM",
        };
        let mut config = json!({
        "architectures": [class],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "num_hidden_layers": n_layer,
        "num_attention_heads": n_head,
        "num_key_value_heads": n_head_kv,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": eps,
        "rope_theta": theta,
        "max_position_embeddings": ctx_len,
        "vocab_size": vocab_size,
        "tie_word_embeddings": tie,
        "attention_bias": false,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "torch_dtype": "float32",
        });
        if model_type == "gemma3_text" {
            gemma3_config(
                path,
                content,
                &mut config,
                (n_layer, hidden, n_head, head_dim),
            )?;
        }
        config
    };
    let generation_config = Some(json!({ "bos_token_id": bos, "eos_token_id": eos }));
    Ok(Checkpoint {
        path: path.to_path_buf(),
        format: Format::Gguf,
        config,
        tensors,
        tokenizer: Some(tokenizer),
        generation_config,
        side_files: Default::default(),
    })
}

#[cfg(test)]
mod tests;
