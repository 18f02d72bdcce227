//! GGUF: read (memory-mapped; dequantize every type candle knows; undo llama.cpp's Q/K permutation;
//! rebuild config and tokenizer from metadata) and write (version 3, aligned, any ggml type).

use crate::gguf_write::{GgufEntry, GgufValue, GgufWriter};
use crate::tokenizer::{GgufVocab, TokenizerBundle};
use crate::{io_error, Checkpoint, Format, IoError, Result};
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use serde_json::json;
use shrink_models::family::{self, gpt2, llama};
use std::collections::BTreeMap;
use std::io::Cursor;
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

/// Reads the header, metadata and tensor table, after checking the file's layout
/// ([`crate::check_gguf_layout`]) so that candle's reader only sees well-formed files.
pub(crate) fn read_content(path: &Path, bytes: &[u8]) -> Result<gguf_file::Content> {
    crate::gguf_layout::check_gguf_layout(path, bytes)?;
    gguf_file::Content::read(&mut Cursor::new(bytes)).map_err(|e| IoError::Format {
        path: path.to_path_buf(),
        message: format!("corrupt GGUF header: {e}"),
    })
}

/// The float type a GGUF tensor type holds its values in, read as they are; `None` for block
/// types, which are dequantized to f32.
fn float_dtype(dtype: GgmlDType) -> Option<DType> {
    match dtype {
        GgmlDType::F32 => Some(DType::F32),
        GgmlDType::F16 => Some(DType::F16),
        GgmlDType::BF16 => Some(DType::BF16),
        _ => None,
    }
}

pub(crate) fn tensor_bytes(dtype: GgmlDType, elems: usize) -> Option<usize> {
    let block = dtype.block_size();
    elems
        .is_multiple_of(block)
        .then(|| elems / block * dtype.type_size())
}

fn meta<'a>(content: &'a gguf_file::Content, key: &str) -> Option<&'a Value> {
    content.metadata.get(key)
}

fn meta_err(path: &Path, key: &str, message: impl Into<String>) -> IoError {
    IoError::Metadata {
        path: path.to_path_buf(),
        key: key.to_string(),
        message: message.into(),
    }
}

fn meta_u64(path: &Path, content: &gguf_file::Content, key: &str) -> Result<Option<u64>> {
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

fn meta_req_u64(path: &Path, content: &gguf_file::Content, key: &str) -> Result<u64> {
    meta_u64(path, content, key)?.ok_or_else(|| meta_err(path, key, "missing"))
}

fn meta_f64(path: &Path, content: &gguf_file::Content, key: &str) -> Result<Option<f64>> {
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

fn meta_str<'a>(
    path: &Path,
    content: &'a gguf_file::Content,
    key: &str,
) -> Result<Option<&'a str>> {
    match meta(content, key) {
        None => Ok(None),
        Some(v) => v
            .to_string()
            .map(|s| Some(s.as_str()))
            .map_err(|_| meta_err(path, key, "expected a string")),
    }
}

fn meta_bool(content: &gguf_file::Content, key: &str) -> Option<bool> {
    meta(content, key).and_then(|v| v.to_bool().ok())
}

fn meta_array<'a>(
    path: &Path,
    content: &'a gguf_file::Content,
    key: &str,
) -> Result<&'a Vec<Value>> {
    meta(content, key)
        .ok_or_else(|| meta_err(path, key, "missing"))?
        .to_vec()
        .map_err(|_| meta_err(path, key, "expected an array"))
}

/// The GGUF name for a Hugging Face tensor name (llama layout), or `None` if unknown.
pub fn hf_to_gguf_name(name: &str) -> Option<String> {
    llama::GGUF.to_gguf(name).map(|(g, _)| g)
}

/// llama.cpp's `llama` architecture stores Q/K rows with RoPE pairs interleaved: HF row
/// `h*hd + half*hd/2 + j` is GGUF row `h*hd + 2*j + half`. `to_hf` selects the direction.
fn permute_qk(t: &Tensor, n_head: usize, to_hf: bool) -> candle_core::Result<Tensor> {
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

/// The checkpoint of a mapped GGUF file whose header `content` is already read.
pub(crate) fn checkpoint_of(
    path: &Path,
    mmap: &std::sync::Arc<memmap2::Mmap>,
    content: &gguf_file::Content,
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
    for (name, info) in &content.tensor_infos {
        let tensor_err = |message: String| IoError::Tensor {
            path: path.to_path_buf(),
            tensor: name.clone(),
            message,
        };
        if name == "rope_freqs.weight" {
            continue; // a precomputed RoPE table; the model computes its own
        }
        let (hf, conv1d) = if arch == "gpt2" {
            &gpt2::GGUF
        } else {
            &llama::GGUF
        }
        .to_hf(name)
        .ok_or_else(|| tensor_err(format!("unknown tensor name for the {arch} architecture")))?;
        let heads = match () {
            _ if arch != "llama" => None,
            _ if hf.contains("self_attn.q_proj") => Some(n_head),
            _ if hf.contains("self_attn.k_proj") => Some(n_head_kv),
            _ => None,
        };
        let mut shape = info.shape.dims().to_vec();
        if conv1d {
            shape.reverse();
        }
        let (ggml_dtype, dims, offset) = (info.ggml_dtype, info.shape.clone(), info.offset);
        let (mmap, data_offset) = (mmap.clone(), content.tensor_data_offset);
        let (path, gguf_name) = (path.to_path_buf(), name.clone());
        let load = move |dtype: DType| -> Result<Tensor> {
            let tensor_err = |message: String| IoError::Tensor {
                path: path.clone(),
                tensor: gguf_name.clone(),
                message,
            };
            let info = gguf_file::TensorInfo {
                ggml_dtype,
                shape: dims.clone(),
                offset,
            };
            let start = (data_offset + offset) as usize;
            let bytes = tensor_bytes(ggml_dtype, info.shape.elem_count()).unwrap_or(0);
            // Float tensors are copied from the file in their own type (an f16 matrix is not
            // widened to f32 on the way); blocks are dequantized to f32.
            let mut t = match float_dtype(ggml_dtype) {
                Some(float) => {
                    let data = mmap
                        .get(start..start + bytes)
                        .ok_or_else(|| tensor_err("its data lies outside the file".into()))?;
                    Tensor::from_raw_buffer(data, float, info.shape.dims(), &Device::Cpu)
                        .map_err(|e| tensor_err(e.to_string()))?
                }
                None => info
                    .read(&mut Cursor::new(&mmap[..]), data_offset, &Device::Cpu)
                    .map_err(|e| tensor_err(e.to_string()))?
                    .dequantize(&Device::Cpu)
                    .map_err(|e| tensor_err(format!("cannot dequantize {ggml_dtype:?}: {e}")))?,
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
            t.to_dtype(dtype).map_err(|e| tensor_err(e.to_string()))
        };
        let stored = float_dtype(ggml_dtype).unwrap_or(DType::F32);
        tensors.insert_stored(hf, shape, stored, std::sync::Arc::new(load))?;
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
        json!({
        "architectures": [if model_type == "qwen2" { "Qwen2ForCausalLM" } else { "LlamaForCausalLM" }],
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
        })
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

/// The ggml type to store a checkpoint's 2-D weights in (1-D tensors always stay F32).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufWriteType {
    F32,
    F16,
    Q8_0,
}

impl GgufWriteType {
    fn ggml(self) -> GgmlDType {
        match self {
            GgufWriteType::F32 => GgmlDType::F32,
            GgufWriteType::F16 => GgmlDType::F16,
            GgufWriteType::Q8_0 => GgmlDType::Q8_0,
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

/// A weight already quantized into ggml blocks (row-major, Hugging Face row order), written as is.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizedBlocks {
    pub dtype: GgmlDType,
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

fn file_type_of(dtype: GgmlDType) -> u32 {
    match dtype {
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q8_0 => 7,
        GgmlDType::Q5_0 => 8,
        GgmlDType::Q5_1 => 9,
        GgmlDType::Q2K => 10,
        GgmlDType::Q3K => 12,
        GgmlDType::Q4K => 15,
        GgmlDType::Q5K => 17,
        GgmlDType::Q6K => 18,
        _ => 0,
    }
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
}

impl LlamaGguf {
    /// The layout of `checkpoint` to be written to `path`, with the tensors of `quantized` (by Hugging
    /// Face name) in the given block types, other 2-D tensors as `weight_type` and 1-D ones as F32.
    pub fn plan(
        checkpoint: &Checkpoint,
        path: &Path,
        weight_type: GgufWriteType,
        quantized: &BTreeMap<String, GgmlDType>,
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
            *counts.entry(file_type_of(*dtype)).or_default() += 1;
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
        let names = if gpt2 { &gpt2::GGUF } else { &llama::GGUF };
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
                        GgmlDType::F32
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

    /// The data of entry `i` from its tensor (Hugging Face layout), converted to its type.
    pub fn tensor_data(&self, i: usize, t: &Tensor) -> Result<Vec<u8>> {
        let err = |e: candle_core::Error| self.error(i, e.to_string());
        let t = if self.conv1d[i] {
            t.t().and_then(|t| t.contiguous()).map_err(err)?
        } else {
            t.clone()
        };
        let mut t = t.to_dtype(DType::F32).map_err(err)?;
        if let Some(heads) = self.permute[i] {
            t = permute_qk(&t, heads, false).map_err(err)?;
        }
        if t.dims() != self.entries[i].dims.as_slice() {
            return Err(self.error(
                i,
                format!(
                    "shape {:?}, but the layout holds {:?}",
                    t.dims(),
                    self.entries[i].dims
                ),
            ));
        }
        let q = QTensor::quantize(&t, self.entries[i].dtype).map_err(err)?;
        q.data().map(|d| d.to_vec()).map_err(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qk_permutation_matches_the_documented_row_mapping() {
        // 2 heads of head_dim 4, 1 column: HF row h*4 + half*2 + j -> GGUF row h*4 + 2*j + half.
        let hf: Vec<f32> = (0..8).map(|v| v as f32).collect();
        let t = Tensor::from_vec(hf, (8, 1), &Device::Cpu).unwrap();
        let g: Vec<f32> = permute_qk(&t, 2, false)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let mut want = [0f32; 8];
        for h in 0..2 {
            for half in 0..2 {
                for j in 0..2 {
                    want[h * 4 + 2 * j + half] = (h * 4 + half * 2 + j) as f32;
                }
            }
        }
        assert_eq!(g, want);
        let back =
            permute_qk(&Tensor::from_vec(g, (8, 1), &Device::Cpu).unwrap(), 2, true).unwrap();
        assert_eq!(
            back.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            (0..8).map(|v| v as f32).collect::<Vec<_>>()
        );
    }

    #[test]
    fn tensor_names_round_trip() {
        for n in [
            "model.embed_tokens.weight",
            "model.layers.12.self_attn.k_proj.bias",
            "model.layers.0.mlp.down_proj.weight",
            "model.layers.3.post_attention_layernorm.weight",
            "lm_head.weight",
        ] {
            assert_eq!(
                llama::GGUF.to_hf(&hf_to_gguf_name(n).unwrap()).unwrap().0,
                n
            );
        }
        assert_eq!(
            hf_to_gguf_name("model.layers.1.mlp.gate_proj.weight").unwrap(),
            "blk.1.ffn_gate.weight"
        );
        assert!(llama::GGUF.to_hf("blk.1.ffn_gate_exps.weight").is_none());
    }
}
