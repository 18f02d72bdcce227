//! Hugging Face folders: `config.json`, `model.safetensors` or a sharded
//! `model.safetensors.index.json`, `tokenizer.json`, `tokenizer_config.json`,
//! `generation_config.json`. Safetensors files are memory-mapped.

use crate::{io_error, Checkpoint, Format, IoError, Result};
use candle_core::{DType, Tensor};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub(crate) fn read_json(path: &Path) -> Result<serde_json::Value> {
    if !path.is_file() {
        return Err(IoError::NotFound {
            path: path.to_path_buf(),
        });
    }
    let text = std::fs::read_to_string(path).map_err(io_error(path))?;
    serde_json::from_str(&text).map_err(|e| IoError::Format {
        path: path.to_path_buf(),
        message: format!("invalid JSON: {e}"),
    })
}

/// The safetensors files of a folder: the shards listed by the index, or `model.safetensors`.
pub(crate) fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let value = read_json(&index)?;
        let map = value
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| IoError::Metadata {
                path: index.clone(),
                key: "weight_map".into(),
                message: "missing or not an object".into(),
            })?;
        let mut files = BTreeSet::new();
        for (tensor, file) in map {
            let file = file.as_str().ok_or_else(|| IoError::Metadata {
                path: index.clone(),
                key: format!("weight_map.{tensor}"),
                message: "not a file name".into(),
            })?;
            // A shard is a file of this folder: no absolute paths, no `..`.
            let relative = Path::new(file);
            if file.is_empty()
                || !relative
                    .components()
                    .all(|c| matches!(c, std::path::Component::Normal(_)))
            {
                return Err(IoError::Metadata {
                    path: index.clone(),
                    key: format!("weight_map.{tensor}"),
                    message: format!(
                        "shard `{file}` is not a file inside the model folder {}",
                        dir.display()
                    ),
                });
            }
            files.insert(dir.join(relative));
        }
        return Ok(files.into_iter().collect());
    }
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    Err(IoError::NotFound { path: single })
}

/// Memory-maps one safetensors file and adds its float tensors to `out`, each converted from its
/// stored type when it is loaded (integer tensors are read into `ints` now), and each tensor as
/// stored to `stored`; returns the file's size.
pub(crate) fn read_safetensors(
    path: &Path,
    out: &mut crate::Tensors,
    ints: &mut BTreeMap<String, crate::compressed::IntTensor>,
    stored: &mut Vec<crate::TensorSummary>,
) -> Result<u64> {
    if !path.is_file() {
        return Err(IoError::NotFound {
            path: path.to_path_buf(),
        });
    }
    let mmap = Arc::new(crate::gguf::map(path)?);
    let st = safetensors::SafeTensors::deserialize(&mmap).map_err(|e| IoError::Format {
        path: path.to_path_buf(),
        message: format!("corrupt or truncated safetensors file: {e}"),
    })?;
    for (name, view) in st.tensors() {
        stored.push(crate::inspect::stored(
            name.clone(),
            view.dtype(),
            view.shape().to_vec(),
            view.data().len(),
        ));
        if out.contains(&name) || ints.contains_key(&name) {
            return Err(IoError::Tensor {
                path: path.to_path_buf(),
                tensor: name,
                message: "appears in more than one shard".into(),
            });
        }
        if matches!(
            view.dtype(),
            safetensors::Dtype::I8 | safetensors::Dtype::I32
        ) {
            ints.insert(name.clone(), crate::compressed::IntTensor::from_view(&view));
            continue;
        }
        let (stored_dtype, shape) = (view.dtype(), view.shape().to_vec());
        let start = view.data().as_ptr() as usize - mmap.as_ptr() as usize;
        let range = start..start + view.data().len();
        let (mmap, file, tensor) = (mmap.clone(), path.to_path_buf(), name.clone());
        let load = move |dtype: DType| -> Result<Tensor> {
            let err = |message: String| IoError::Tensor {
                path: file.clone(),
                tensor: tensor.clone(),
                message,
            };
            let t = tensor_from_map(&mmap, range.clone(), stored_dtype, &shape)
                .map_err(|e| err(e.to_string()))?;
            let stored = t.dtype();
            t.to_dtype(dtype).map_err(|e| match stored {
                DType::F32 | DType::F16 | DType::BF16 | DType::F64 => err(e.to_string()),
                other => err(format!("cannot convert {other:?} to {dtype:?}: {e}")),
            })
        };
        let natural = match stored_dtype {
            safetensors::Dtype::F16 => DType::F16,
            safetensors::Dtype::BF16 => DType::BF16,
            _ => DType::F32,
        };
        out.insert_stored(name, view.shape().to_vec(), natural, Arc::new(load))?;
    }
    Ok(std::fs::metadata(path).map_err(io_error(path))?.len())
}

/// The tensor of `dtype` and `shape` stored (little-endian) in `range` of a map: its bytes copied
/// a slice at a time straight into the tensor's buffer, the slices in parallel, each slice's pages
/// released once copied ([`crate::gguf::release`]), so the tensor is resident once, never twice.
/// The values are those candle's safetensors reader gives.
pub(crate) fn tensor_from_map(
    mmap: &memmap2::Mmap,
    range: std::ops::Range<usize>,
    dtype: safetensors::Dtype,
    shape: &[usize],
) -> candle_core::Result<Tensor> {
    fn owned<T: candle_core::WithDType>(
        mmap: &memmap2::Mmap,
        range: std::ops::Range<usize>,
        shape: &[usize],
    ) -> candle_core::Result<Tensor> {
        use rayon::prelude::*;
        const SLICE: usize = 1 << 20;
        let size = std::mem::size_of::<T>();
        let n = range.len() / size;
        let bytes = &mmap[range.start..range.start + n * size];
        let mut values: Vec<T> = Vec::with_capacity(n);
        values.spare_capacity_mut()[..n]
            .par_chunks_mut(SLICE / size)
            .zip(bytes.par_chunks(SLICE))
            .enumerate()
            .for_each(|(k, (dst, slice))| {
                // SAFETY: `dst` holds `slice.len() / size` elements, `slice.len()` bytes, and
                // does not overlap the map.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        slice.as_ptr(),
                        dst.as_mut_ptr() as *mut u8,
                        slice.len(),
                    )
                };
                let at = range.start + k * SLICE;
                crate::gguf::release(mmap, at..at + slice.len());
            });
        // SAFETY: all `n` elements were written above; they are plain numbers, for which every
        // bit pattern is valid.
        unsafe { values.set_len(n) };
        Tensor::from_vec(values, shape, &candle_core::Device::Cpu)
    }
    use safetensors::Dtype as D;
    match dtype {
        D::F32 => owned::<f32>(mmap, range, shape),
        D::F16 => owned::<half::f16>(mmap, range, shape),
        D::BF16 => owned::<half::bf16>(mmap, range, shape),
        D::F64 => owned::<f64>(mmap, range, shape),
        D::U8 => owned::<u8>(mmap, range, shape),
        D::U32 => owned::<u32>(mmap, range, shape),
        D::I64 => owned::<i64>(mmap, range, shape),
        other => Err(candle_core::Error::Msg(format!(
            "unsupported safetensors dtype {other:?}"
        ))),
    }
}

/// Files carried over verbatim from a Hugging Face folder ([`Checkpoint::side_files`]).
const SIDE_FILES: [&str; 7] = [
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    "1_Pooling/config.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
];

/// Loads a Hugging Face folder, and inspects it from the same reads.
pub(crate) fn open_hf(dir: &Path) -> Result<(Checkpoint, crate::Inspection)> {
    let config = read_json(&dir.join("config.json"))?;
    let mut tensors = crate::Tensors::empty(dir.to_path_buf());
    let mut ints = BTreeMap::new();
    let mut stored = Vec::new();
    let mut size = 0;
    for file in safetensors_files(dir)? {
        size += read_safetensors(&file, &mut tensors, &mut ints, &mut stored)?;
    }
    let inspection = crate::inspect::of_hf(dir, &config, size, stored);
    crate::compressed::decompress(dir, &config, &mut tensors, ints)?;
    let tokenizer = crate::tokenizer::load_hf_tokenizer(dir, &config)?;
    let gen_path = dir.join("generation_config.json");
    let generation_config = if gen_path.is_file() {
        Some(read_json(&gen_path)?)
    } else {
        None
    };
    let mut side_files = BTreeMap::new();
    for name in SIDE_FILES {
        let path = dir.join(name);
        if path.is_file() {
            side_files.insert(
                name.to_string(),
                std::fs::read(&path).map_err(io_error(&path))?,
            );
        }
    }
    let checkpoint = Checkpoint {
        path: dir.to_path_buf(),
        format: Format::HfFolder,
        config,
        tensors,
        tokenizer,
        generation_config,
        side_files,
    };
    Ok((checkpoint, inspection))
}

/// The float type tensors are stored in when saving a Hugging Face folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaveDType {
    F32,
    F16,
    BF16,
}

impl SaveDType {
    /// The float type a [`crate::GgufWriteType`] stores weights in, in a folder (F32 for Q8_0).
    pub fn of_gguf(t: crate::GgufWriteType) -> Self {
        match t {
            crate::GgufWriteType::F16 => SaveDType::F16,
            _ => SaveDType::F32,
        }
    }

    /// The safetensors type of this float type.
    pub fn safetensors(self) -> safetensors::Dtype {
        match self {
            SaveDType::F32 => safetensors::Dtype::F32,
            SaveDType::F16 => safetensors::Dtype::F16,
            SaveDType::BF16 => safetensors::Dtype::BF16,
        }
    }

    fn dtype(self) -> DType {
        match self {
            SaveDType::F32 => DType::F32,
            SaveDType::F16 => DType::F16,
            SaveDType::BF16 => DType::BF16,
        }
    }

    fn torch_name(self) -> &'static str {
        match self {
            SaveDType::F32 => "float32",
            SaveDType::F16 => "float16",
            SaveDType::BF16 => "bfloat16",
        }
    }
}

/// Writes `checkpoint` as a Hugging Face folder at `out`: built in a staging folder and renamed
/// into place, so an interrupted save leaves nothing behind.
pub fn save_hf(checkpoint: &Checkpoint, out: &Path, dtype: SaveDType) -> Result<()> {
    save_hf_with(checkpoint, out, dtype, &BTreeMap::new(), None)
}

/// [`save_hf`] plus stored-as-is tensors (`raw`, e.g. packed integer weights, which replace any
/// float tensor of the same name) and a `quantization_config` for `config.json`.
pub fn save_hf_with(
    checkpoint: &Checkpoint,
    out: &Path,
    dtype: SaveDType,
    raw: &BTreeMap<String, crate::compressed::RawTensor>,
    quantization_config: Option<&serde_json::Value>,
) -> Result<()> {
    let staged = shrink_core::AtomicDir::new(out)?;
    let dir = staged.path().to_path_buf();
    let config = hf_config(checkpoint, dtype, quantization_config);
    write_json(&dir.join("config.json"), &config)?;

    let mut converted: BTreeMap<String, crate::compressed::RawTensor> = BTreeMap::new();
    for name in checkpoint.tensors.names() {
        let t = checkpoint.tensors.get(name)?;
        let t = t.to_dtype(dtype.dtype()).map_err(|e| IoError::Tensor {
            path: out.to_path_buf(),
            tensor: name.clone(),
            message: e.to_string(),
        })?;
        converted.insert(
            name.clone(),
            crate::compressed::RawTensor::from_tensor(&t).map_err(|e| IoError::Tensor {
                path: out.to_path_buf(),
                tensor: name.clone(),
                message: e.to_string(),
            })?,
        );
    }
    for (name, t) in raw {
        converted.insert(name.clone(), t.clone());
    }
    let st_path = dir.join("model.safetensors");
    let mut metadata = std::collections::HashMap::new();
    metadata.insert("format".to_string(), "pt".to_string());
    let bytes = safetensors::serialize(
        converted.iter().map(|(n, t)| (n.as_str(), t)),
        Some(metadata),
    )
    .map_err(|e| IoError::Format {
        path: st_path.clone(),
        message: format!("serializing safetensors: {e}"),
    })?;
    shrink_core::atomic_write(&st_path, &bytes)?;

    save_hf_files(checkpoint, &dir, &config)?;
    staged.commit()?;
    Ok(())
}

/// The `config.json` of `checkpoint`'s model written in `dtype`, with its `quantization_config`.
pub fn hf_config(
    checkpoint: &Checkpoint,
    dtype: SaveDType,
    quantization_config: Option<&serde_json::Value>,
) -> serde_json::Value {
    let mut config = checkpoint.config.clone();
    if let Some(obj) = config.as_object_mut() {
        obj.insert("torch_dtype".into(), dtype.torch_name().into());
        if let Some(q) = quantization_config {
            obj.insert("quantization_config".into(), q.clone());
        }
    }
    config
}

/// Writes `value` as pretty JSON to `path`, atomically.
pub fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value).map_err(|e| IoError::Format {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    text.push('\n');
    Ok(shrink_core::atomic_write(path, text.as_bytes())?)
}

/// Everything of a Hugging Face folder but `config.json` and the weights: the tokenizer files,
/// the side files carried over and `generation_config.json`, written into `dir` for a model of
/// `config`.
pub fn save_hf_files(
    checkpoint: &Checkpoint,
    dir: &Path,
    config: &serde_json::Value,
) -> Result<()> {
    let json_file = |name: &str, value: &serde_json::Value| write_json(&dir.join(name), value);
    if let Some(tok) = &checkpoint.tokenizer {
        let text = tok
            .tokenizer
            .to_string(true)
            .map_err(|e| IoError::Tokenizer {
                path: dir.join("tokenizer.json"),
                message: e.to_string(),
            })?;
        shrink_core::atomic_write(&dir.join("tokenizer.json"), text.as_bytes())?;
        let token = |id: Option<u32>| id.and_then(|id| tok.token_text(id));
        let mut tc = serde_json::json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": tok.add_bos,
            "add_eos_token": false,
            "clean_up_tokenization_spaces": false,
            "model_max_length": config.get("max_position_embeddings").cloned().unwrap_or(2048.into()),
        });
        if let Some(b) = token(tok.bos_token_id) {
            tc["bos_token"] = b.into();
        }
        if let Some(e) = token(tok.eos_token_ids.first().copied()) {
            tc["eos_token"] = e.into();
        }
        if let Some(t) = &tok.chat_template {
            tc["chat_template"] = t.clone().into();
        }
        if !checkpoint.side_files.contains_key("tokenizer_config.json") {
            json_file("tokenizer_config.json", &tc)?;
        }
    }
    for (name, bytes) in &checkpoint.side_files {
        let path = dir.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io_error(parent))?;
        }
        shrink_core::atomic_write(&path, bytes)?;
    }
    let generation = checkpoint.generation_config.clone().unwrap_or_else(|| {
        serde_json::json!({
            "bos_token_id": config.get("bos_token_id"),
            "eos_token_id": config.get("eos_token_id"),
        })
    });
    json_file("generation_config.json", &generation)?;
    Ok(())
}
