//! Reading and writing model files. Every format is loaded into one in-memory form, a
//! [`Checkpoint`]: a Hugging Face `config.json`, tensors under Hugging Face names and layout, and the
//! tokenizer. GGUF files are memory-mapped, their tensors dequantized to f32, llama.cpp's Q/K row
//! permutation undone and their tokenizer rebuilt from the metadata.
//!
//! ```no_run
//! let checkpoint = shrink_io::load(std::path::Path::new("SmolLM2-135M-Instruct.Q4_1.gguf"))?;
//! assert_eq!(checkpoint.config["num_hidden_layers"], 30);
//! let tokens = checkpoint.tokenizer()?.encode("To be, or not to be", false)?;
//! shrink_io::save_hf(&checkpoint, std::path::Path::new("smollm2-hf"), shrink_io::SaveDType::F32)?;
//! # Ok::<(), shrink_io::IoError>(())
//! ```

mod compressed;
mod export;
pub mod ggml;
mod gguf;
mod gguf_layout;
mod gguf_llama;
mod gguf_write;
mod hf;
mod inspect;
mod shards;
mod stream;
mod tensors;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
mod tokenizer;

pub use compressed::{pack_rows, target_matches, IntTensor, RawTensor};
pub use export::{check_export, config_for, write_model, Export, ModelStream};
pub use gguf::hf_to_gguf_name;
pub use gguf_layout::{check_gguf_layout, GgufLayout, GgufTensorLayout};
pub use gguf_llama::{gguf_vocab_of, write_llama_gguf, GgufWriteType, LlamaGguf, QuantizedBlocks};
pub use gguf_write::{write_gguf, GgufEntry, GgufTensor, GgufValue, GgufWriter};
pub use hf::{hf_config, save_hf, save_hf_files, save_hf_with, write_json, SaveDType};
pub use inspect::{inspect, Inspection, TensorSummary};
pub use shards::{SafetensorsEntry, ShardedWriter, MAX_SHARD_BYTES};
pub use stream::{GgufStream, HfStream, TensorSink};
pub use tensors::{LoadFn, Tensors};
pub use tokenizer::{GgufVocab, TokenizerBundle};

use candle_core::DType;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Errors from reading or writing model files; each names the file and, where it applies, the
/// tensor or metadata key.
#[derive(Debug, thiserror::Error)]
pub enum IoError {
    #[error("{path}: no such file or directory")]
    NotFound { path: PathBuf },
    #[error("{path}: {message}")]
    Format { path: PathBuf, message: String },
    #[error("{path}: tensor '{tensor}': {message}")]
    Tensor {
        path: PathBuf,
        tensor: String,
        message: String,
    },
    #[error("{path}: metadata key '{key}': {message}")]
    Metadata {
        path: PathBuf,
        key: String,
        message: String,
    },
    #[error("{path}: unsupported architecture '{architecture}' (supported: {supported})")]
    UnknownArchitecture {
        path: PathBuf,
        architecture: String,
        supported: &'static str,
    },
    #[error("{path}: tokenizer: {message}")]
    Tokenizer { path: PathBuf, message: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A write that failed, with the file being written.
    #[error("writing {path}: {source}")]
    Write { path: PathBuf, source: Box<IoError> },
    /// A model that cannot be written where it was asked to go.
    #[error("{0}")]
    Export(String),
    #[error(transparent)]
    Model(#[from] shrink_models::ModelError),
    #[error(transparent)]
    Core(#[from] shrink_core::CoreError),
}

impl IoError {
    /// `source`, as the error of writing `path`.
    pub fn written(path: &Path, source: IoError) -> IoError {
        IoError::Write {
            path: path.to_path_buf(),
            source: Box::new(source),
        }
    }
}

pub type Result<T> = std::result::Result<T, IoError>;

pub(crate) fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> IoError + '_ {
    move |source| IoError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The on-disk format a checkpoint came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Gguf,
    #[serde(rename = "hf")]
    HfFolder,
}

/// A model in memory, whatever file it came from: Hugging Face config, names and layout.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub path: PathBuf,
    pub format: Format,
    /// The Hugging Face `config.json` (for GGUF files, derived from the metadata).
    pub config: serde_json::Value,
    /// Tensors under Hugging Face names and `[out, in]` layout, each read from the file (and
    /// dequantized) only when loaded.
    pub tensors: Tensors,
    pub tokenizer: Option<TokenizerBundle>,
    pub generation_config: Option<serde_json::Value>,
    /// Small files of a Hugging Face folder carried over verbatim when it is written again, by
    /// path relative to the folder: sentence-transformers' `modules.json` and
    /// `1_Pooling/config.json`, the original `tokenizer_config.json`, `vocab.txt`, …
    pub side_files: BTreeMap<String, Vec<u8>>,
}

impl Checkpoint {
    /// Every tensor loaded in f32, refusing NaN or infinite values and naming the first tensor
    /// that holds one: a compression of such a model would write them on.
    pub fn load_finite(&self) -> Result<BTreeMap<String, candle_core::Tensor>> {
        self.tensors
            .names()
            .map(|name| Ok((name.clone(), self.load_checked(name, DType::F32)?)))
            .collect()
    }

    /// One tensor in the float type it is stored in (f32 for a dequantized GGUF block type),
    /// refusing NaN or infinite values: a bf16 embedding is not widened whole to be written on.
    pub fn load_stored(&self, name: &str) -> Result<candle_core::Tensor> {
        let dtype = self.tensors.dtype(name).unwrap_or(DType::F32);
        self.load_checked(name, dtype)
    }

    /// One tensor in `dtype`, refusing NaN or infinite values.
    pub fn load_checked(&self, name: &str, dtype: DType) -> Result<candle_core::Tensor> {
        let t = self.tensors.get_as(name, dtype)?;
        let check = || all_finite(&t);
        let problem = match check() {
            Ok(ok) => (!ok).then(|| "holds NaN or infinite values".to_string()),
            Err(e) => Some(e.to_string()),
        };
        match problem {
            Some(message) => Err(IoError::Tensor {
                path: self.path.clone(),
                tensor: name.to_string(),
                message,
            }),
            None => Ok(t),
        }
    }

    /// The model read block by block from this checkpoint's (memory-mapped) file, in `dtype`:
    /// each tensor is loaded, checked to be finite, when its block is worked on. Only the Llama
    /// family streams.
    pub fn streamed(&self, dtype: DType) -> Result<shrink_models::StreamedModel> {
        self.streamed_with(dtype, false)
    }

    /// [`Checkpoint::streamed`] with every tensor in the float type it is stored in (f32 for
    /// GGUF blocks, which are dequantized): a job that only reads the weights (rounding without
    /// calibration) holds an f16 or bf16 block at 2 bytes a weight, whatever the norms are stored in.
    pub fn streamed_as_stored(&self) -> Result<shrink_models::StreamedModel> {
        self.streamed_with(DType::F32, true)
    }

    fn streamed_with(&self, dtype: DType, stored: bool) -> Result<shrink_models::StreamedModel> {
        let config = shrink_models::ModelConfig::from_json(&self.config)?;
        // What loading needs: the tensors and the path errors name (not the tokenizer).
        let checkpoint = Checkpoint {
            path: self.path.clone(),
            format: self.format,
            config: serde_json::Value::Null,
            tensors: self.tensors.clone(),
            tokenizer: None,
            generation_config: None,
            side_files: BTreeMap::new(),
        };
        let tensors = self.tensors.clone();
        let stored_type = move |name: &str| tensors.dtype(name);
        let load = move |name: &str, dtype: DType| {
            let dtype = match stored {
                true => checkpoint.tensors.dtype(name).unwrap_or(DType::F32),
                false => dtype,
            };
            checkpoint
                .load_checked(name, dtype)
                .map_err(|e| shrink_models::ModelError::Load(Box::new(e)))
        };
        let model = shrink_models::StreamedModel::new(&config, dtype, Box::new(load))?
            .knowing_stored_types(Box::new(stored_type));
        Ok(if stored {
            model.keeping_stored_types()
        } else {
            model
        })
    }

    /// Where the weights this checkpoint stores in ggml blocks are read from, for
    /// [`shrink_models::Transformer::set_packed`] and
    /// [`shrink_models::StreamedModel::multiplying_packed`]: a weight's blocks are read from the
    /// file when asked for; float tensors (and checkpoints that are not GGUF files) have none.
    pub fn packed_source(&self) -> Box<shrink_models::PackedLoader> {
        let tensors = self.tensors.clone();
        Box::new(move |name: &str| {
            tensors
                .packed(name)
                .map(|p| p.map(std::sync::Arc::new))
                .map_err(|e| shrink_models::ModelError::Load(Box::new(e)))
        })
    }

    /// A side file parsed as JSON, if the folder had it.
    pub fn side_json(&self, name: &str) -> Result<Option<serde_json::Value>> {
        match self.side_files.get(name) {
            None => Ok(None),
            Some(bytes) => serde_json::from_slice(bytes)
                .map(Some)
                .map_err(|e| IoError::Format {
                    path: self.path.join(name),
                    message: format!("invalid JSON: {e}"),
                }),
        }
    }

    /// The tokenizer, or an error naming the file when the checkpoint has none.
    pub fn tokenizer(&self) -> Result<&TokenizerBundle> {
        self.tokenizer.as_ref().ok_or_else(|| IoError::Tokenizer {
            path: self.path.clone(),
            message: "the model has no tokenizer (tokenizer.json missing)".into(),
        })
    }
}

/// Loads a GGUF file or a Hugging Face folder (chosen by what `path` is).
pub fn load(path: &Path) -> Result<Checkpoint> {
    open(path).map(|file| file.checkpoint)
}

/// A model file (or folder) read once: its checkpoint, and what measuring reads besides the
/// tensors ([`FileView`]).
pub struct ModelFile {
    pub checkpoint: Checkpoint,
    pub view: FileView,
}

/// A model file as measuring sees it: its [`Inspection`], from the headers read when it was
/// loaded, and for a GGUF file its mapped bytes, which candle's quantized reader can time decoding
/// from without opening the file again. Drop it once measured: the map keeps the file's pages.
pub struct FileView {
    pub inspection: Inspection,
    gguf: Option<std::sync::Arc<memmap2::Mmap>>,
}

impl FileView {
    /// The whole GGUF file, as mapped when it was loaded (`None` for a Hugging Face folder).
    pub fn gguf_bytes(&self) -> Option<&[u8]> {
        self.gguf.as_ref().map(|m| &m[..])
    }
}

/// Loads and inspects a GGUF file or a Hugging Face folder, reading each file once.
///
/// ```no_run
/// let file = shrink_io::open(std::path::Path::new("model.gguf"))?;
/// println!(
///     "{} tensors, {:.2} bits per weight",
///     file.checkpoint.tensors.len(),
///     file.view.inspection.bits_per_weight
/// );
/// # Ok::<(), shrink_io::IoError>(())
/// ```
pub fn open(path: &Path) -> Result<ModelFile> {
    if !path.exists() {
        return Err(IoError::NotFound {
            path: path.to_path_buf(),
        });
    }
    if path.is_dir() {
        let (checkpoint, inspection) = hf::open_hf(path)?;
        return Ok(ModelFile {
            checkpoint,
            view: FileView {
                inspection,
                gguf: None,
            },
        });
    }
    let empty = std::fs::metadata(path).map_err(io_error(path))?.len() == 0;
    let mmap = if empty {
        None
    } else {
        Some(std::sync::Arc::new(gguf::map(path)?))
    };
    match mmap {
        Some(mmap) if mmap.starts_with(b"GGUF") => {
            let content = gguf::read_content(path, &mmap)?;
            let checkpoint = gguf::checkpoint_of(path, &mmap, &content)?;
            let inspection = inspect::of_gguf(path, &content, mmap.len() as u64);
            Ok(ModelFile {
                checkpoint,
                view: FileView {
                    inspection,
                    gguf: Some(mmap),
                },
            })
        }
        _ => Err(IoError::Format {
            path: path.to_path_buf(),
            message: "not a GGUF file (bad magic) nor a Hugging Face folder".into(),
        }),
    }
}

/// Whether every value of `t` is finite: one read of its storage, testing each value's exponent
/// bits (all ones is NaN or ±∞), without a temporary tensor.
fn all_finite(t: &candle_core::Tensor) -> candle_core::Result<bool> {
    use candle_core::{CpuStorage, Storage};
    fn all<T: Copy>(values: &[T], finite: impl Fn(T) -> bool) -> bool {
        // Branch-free within a chunk (vectorized), stopping at the first chunk that fails.
        values
            .chunks(4096)
            .all(|c| c.iter().fold(true, |ok, &x| ok & finite(x)))
    }
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("a contiguous tensor has no offsets".into()))?;
    Ok(match &*storage {
        Storage::Cpu(CpuStorage::F32(v)) => {
            all(&v[start..end], |x| x.to_bits() & 0x7f80_0000 != 0x7f80_0000)
        }
        Storage::Cpu(CpuStorage::F64(v)) => all(&v[start..end], f64::is_finite),
        Storage::Cpu(CpuStorage::BF16(v)) => {
            all(&v[start..end], |x| x.to_bits() & 0x7f80 != 0x7f80)
        }
        Storage::Cpu(CpuStorage::F16(v)) => all(&v[start..end], |x| x.to_bits() & 0x7c00 != 0x7c00),
        Storage::Cpu(
            CpuStorage::U8(_)
            | CpuStorage::U32(_)
            | CpuStorage::I16(_)
            | CpuStorage::I32(_)
            | CpuStorage::I64(_),
        ) => true,
        // Other types and devices: x − x is 0 for every finite x, NaN for NaN and ±∞.
        _ => {
            drop(storage);
            t.sub(&t)?
                .to_dtype(DType::F32)?
                .sum_all()?
                .to_scalar::<f32>()?
                == 0.0
        }
    })
}

#[cfg(test)]
mod tests;
