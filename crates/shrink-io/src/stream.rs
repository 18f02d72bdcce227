//! Writers for jobs that work block by block: every tensor of the output is planned before any
//! data (names, types, shapes, offsets), tensors are supplied as they become ready, and each is
//! written as soon as every tensor before it in the plan is: a GGUF in llama.cpp's layout
//! ([`GgufStream`]) or a Hugging Face folder of safetensors shards ([`HfStream`]). Only the
//! tensors waiting for an earlier one are held. Quantization and pruning both write through
//! these.

use crate::compressed::RawTensor;
use crate::ggml::GgmlType;
use crate::gguf_llama::{GgufWriteType, LlamaGguf};
use crate::gguf_write::GgufWriter;
use crate::shards::{SafetensorsEntry, ShardedWriter};
use crate::{Checkpoint, IoError, Result};
use candle_core::{DType, Tensor};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

enum Pending {
    /// ggml blocks of the planned type, in Hugging Face row order.
    Blocks(Vec<u8>),
    Tensor(Tensor),
}

/// A GGUF in llama.cpp's layout written tensor by tensor as the tensors are supplied (see the
/// module documentation). The file appears under its name only when [`GgufStream::finish`]
/// succeeds.
pub struct GgufStream {
    layout: LlamaGguf,
    writer: GgufWriter,
    next: usize,
    pending: BTreeMap<String, Pending>,
    out: PathBuf,
}

impl GgufStream {
    /// Plans the GGUF of `written` (tensors under Hugging Face names, their shapes known without
    /// loading them; its config and tokenizer): the tensors of `types` in those ggml types, other
    /// 2-D tensors as `weight_type`, 1-D ones as F32. Writes the header to `file`; with
    /// `resumed`, `file` is a partial GGUF of the same plan that already holds that many tensors
    /// (as [`GgufStream::checkpoint`] counted them).
    pub fn resumable(
        written: &Checkpoint,
        weight_type: GgufWriteType,
        types: &BTreeMap<String, GgmlType>,
        file: shrink_core::AtomicFile,
        resumed: Option<usize>,
    ) -> Result<Self> {
        let out = file.target().to_path_buf();
        let written_to = |e: IoError| IoError::written(&out, e);
        let layout = LlamaGguf::plan(written, &out, weight_type, types).map_err(written_to)?;
        let (writer, next) = match resumed {
            None => (
                GgufWriter::start(file, &layout.metadata, layout.entries.clone())
                    .map_err(written_to)?,
                0,
            ),
            Some(next) => (GgufWriter::resume(file, layout.entries.clone(), next), next),
        };
        Ok(Self {
            layout,
            writer,
            next,
            pending: BTreeMap::new(),
            out,
        })
    }

    /// [`GgufStream::resumable`] into a new file at `out`.
    pub fn create(
        written: &Checkpoint,
        out: &Path,
        weight_type: GgufWriteType,
        types: &BTreeMap<String, GgmlType>,
    ) -> Result<Self> {
        let file = shrink_core::AtomicFile::create(out)?;
        Self::resumable(written, weight_type, types, file, None)
    }

    /// The ggml type `name` (a Hugging Face name) is planned in.
    pub fn planned_type(&self, name: &str) -> Option<GgmlType> {
        let i = self.layout.names.iter().position(|n| n == name)?;
        Some(self.layout.entries[i].dtype)
    }

    /// Whether `name` is planned and neither written nor supplied yet.
    pub fn wants(&self, name: &str) -> bool {
        let index = self.layout.names.iter().position(|n| n == name);
        index.is_some_and(|i| i >= self.next) && !self.pending.contains_key(name)
    }

    /// Supplies `name` as ggml blocks of its planned type (Hugging Face row order).
    pub fn blocks(&mut self, name: &str, bytes: Vec<u8>) -> Result<()> {
        self.supply(name, Pending::Blocks(bytes))
    }

    /// Supplies tensor `name`, converted to its planned type when written.
    pub fn tensor(&mut self, name: &str, t: Tensor) -> Result<()> {
        self.supply(name, Pending::Tensor(t))
    }

    fn supply(&mut self, name: &str, pending: Pending) -> Result<()> {
        if !self.wants(name) {
            return Err(IoError::written(
                &self.out,
                IoError::Export(format!(
                    "'{name}' is not a tensor still to be written to this GGUF"
                )),
            ));
        }
        self.pending.insert(name.to_string(), pending);
        self.flush()
    }

    /// Appends every supplied tensor that is next in the file.
    fn flush(&mut self) -> Result<()> {
        while let Some(name) = self.layout.names.get(self.next) {
            let Some(pending) = self.pending.remove(name) else {
                break;
            };
            let data = match pending {
                Pending::Blocks(bytes) => self.layout.blocks_data(self.next, bytes),
                Pending::Tensor(t) => self.layout.tensor_data(self.next, &t),
            };
            let entry = &self.layout.entries[self.next].name;
            data.and_then(|d| self.writer.append(entry, &d))
                .map_err(|e| IoError::written(&self.out, e))?;
            self.next += 1;
        }
        Ok(())
    }

    /// When every tensor supplied so far is written, flushes the file to the disk and returns
    /// how many tensors and bytes it holds: a point to resume from.
    pub fn checkpoint(&mut self) -> Result<Option<(usize, u64)>> {
        if !self.pending.is_empty() {
            return Ok(None);
        }
        let (tensors, bytes) = self
            .writer
            .sync()
            .map_err(|e| IoError::written(&self.out, e))?;
        Ok(Some((tensors, bytes)))
    }

    /// Checks that every planned tensor was written and puts the file in place.
    pub fn finish(mut self) -> Result<()> {
        self.flush()?;
        self.writer
            .finish()
            .map_err(|e| IoError::written(&self.out, e))
    }
}

/// A streamed writer that takes tensors by checkpoint name, as [`Checkpoint::supply_stored`]
/// feeds them.
pub trait TensorSink {
    type Error: From<IoError>;
    /// Whether `name` is planned and not supplied yet.
    fn wants(&self, name: &str) -> bool;
    /// Supplies tensor `name`.
    fn tensor(&mut self, name: &str, t: Tensor) -> std::result::Result<(), Self::Error>;
}

impl Checkpoint {
    /// Supplies `sink` the tensor `only`, or every tensor of the checkpoint in its order, if
    /// `sink` still wants it, each read in its stored type: what a streamed job writes as stored
    /// (the embedding first, the tensors outside the blocks last).
    pub fn supply_stored<S: TensorSink>(
        &self,
        sink: &mut S,
        only: Option<&str>,
    ) -> std::result::Result<(), S::Error> {
        let names: Vec<String> = match only {
            Some(name) => vec![name.to_string()],
            None => self.tensors.names().cloned().collect(),
        };
        for name in &names {
            if sink.wants(name) {
                sink.tensor(name, self.load_stored(name)?)?;
            }
        }
        Ok(())
    }
}

/// Values converted per slice when a float tensor is written to a folder (16M: 32 MB of f16).
const SLICE: usize = 1 << 24;

enum HfPending {
    Raw(RawTensor),
    Float(Tensor),
}

/// A Hugging Face folder written tensor by tensor as the tensors are supplied (see the module
/// documentation): the safetensors shards of a planned list of entries, then `config.json`, the
/// tokenizer and the side files. The folder is staged and appears under its name only when
/// [`HfStream::finish`] succeeds.
pub struct HfStream<'a> {
    staged: shrink_core::AtomicDir,
    writer: ShardedWriter,
    entries: Vec<SafetensorsEntry>,
    position: BTreeMap<String, usize>,
    next: usize,
    pending: BTreeMap<String, HfPending>,
    checkpoint: &'a Checkpoint,
    config: serde_json::Value,
    out: PathBuf,
}

/// The block a Llama-family tensor belongs to (`model.layers.N.…`).
fn block_of(name: &str) -> Option<usize> {
    let rest = name.split_once("layers.")?.1;
    rest.split('.').next()?.parse().ok()
}

impl<'a> HfStream<'a> {
    /// The order a streamed job supplies `names` in: the token embedding `embedding` first, then
    /// each block's tensors by block (by name within one), then the rest by name.
    pub fn model_order<'n>(
        names: impl Iterator<Item = &'n String>,
        embedding: &str,
    ) -> Vec<String> {
        let mut names: Vec<&String> = names.collect();
        names.sort_by_key(|n| match (n.as_str() == embedding, block_of(n)) {
            (true, _) => (0, 0, n.as_str()),
            (false, Some(b)) => (1, b, n.as_str()),
            (false, None) => (2, 0, n.as_str()),
        });
        names.into_iter().cloned().collect()
    }

    /// Stages the folder of `written` (its tokenizer and side files) at `out`: `entries` in this
    /// order in 5 GB shards, and `config` as its `config.json`.
    pub fn create(
        written: &'a Checkpoint,
        entries: Vec<SafetensorsEntry>,
        config: serde_json::Value,
        out: &Path,
    ) -> Result<Self> {
        Self::resumable(written, entries, config, out, None)
    }

    /// [`HfStream::create`] for a job that can be resumed: with `partial` (a folder kept
    /// across a kill, in a `shrink_core::ResumeDir`) and the number of tensors a killed run of
    /// the same plan recorded there (as [`HfStream::checkpoint`] counted them), the folder
    /// continues from them.
    pub fn resumable(
        written: &'a Checkpoint,
        entries: Vec<SafetensorsEntry>,
        config: serde_json::Value,
        out: &Path,
        partial: Option<(&Path, usize)>,
    ) -> Result<Self> {
        let written_to = |e: IoError| IoError::written(out, e);
        let max = crate::MAX_SHARD_BYTES;
        let (staged, writer) = match partial {
            None => {
                let staged = shrink_core::AtomicDir::new(out).map_err(|e| written_to(e.into()))?;
                let writer = ShardedWriter::create(staged.path(), entries.clone(), max);
                (staged, writer)
            }
            Some((partial, done)) => {
                let staged = shrink_core::AtomicDir::resume(out, partial)
                    .map_err(|e| written_to(e.into()))?;
                let writer = ShardedWriter::resume(staged.path(), entries.clone(), max, done);
                (staged, writer)
            }
        };
        let writer = writer.map_err(written_to)?;
        let next = partial.map_or(0, |(_, done)| done);
        let position = entries
            .iter()
            .enumerate()
            .map(|(i, e)| (e.name.clone(), i))
            .collect();
        Ok(Self {
            staged,
            writer,
            entries,
            position,
            next,
            pending: BTreeMap::new(),
            checkpoint: written,
            config,
            out: out.to_path_buf(),
        })
    }

    /// Whether `name` is planned and neither written nor supplied yet.
    pub fn wants(&self, name: &str) -> bool {
        self.position.get(name).is_some_and(|&i| i >= self.next) && !self.pending.contains_key(name)
    }

    /// Supplies `name` as stored bytes (packed integers, say) of its planned type and shape.
    pub fn raw(&mut self, name: &str, t: RawTensor) -> Result<()> {
        self.supply(name, HfPending::Raw(t))
    }

    /// Supplies float tensor `name`, converted to its planned float type when written.
    pub fn tensor(&mut self, name: &str, t: Tensor) -> Result<()> {
        self.supply(name, HfPending::Float(t))
    }

    fn supply(&mut self, name: &str, pending: HfPending) -> Result<()> {
        if !self.wants(name) {
            return Err(IoError::written(
                &self.out,
                IoError::Export(format!(
                    "'{name}' is not a tensor still to be written to this folder"
                )),
            ));
        }
        self.pending.insert(name.to_string(), pending);
        self.flush()
    }

    /// Appends every supplied tensor that is next in the files.
    fn flush(&mut self) -> Result<()> {
        while let Some(entry) = self.entries.get(self.next) {
            let Some(pending) = self.pending.remove(&entry.name) else {
                break;
            };
            let name = entry.name.clone();
            let written = match pending {
                HfPending::Raw(raw) => self.writer.append(&name, &raw.data),
                HfPending::Float(t) => append_float(&mut self.writer, entry, &t),
            };
            written.map_err(|e| IoError::written(&self.out, e))?;
            self.next += 1;
        }
        Ok(())
    }

    /// When every tensor supplied so far is written, flushes the shard being written to the disk
    /// and returns how many tensors are written and that shard's length: a point to resume from.
    pub fn checkpoint(&mut self) -> Result<Option<(usize, u64)>> {
        if !self.pending.is_empty() {
            return Ok(None);
        }
        let synced = self.writer.sync();
        Ok(Some(synced.map_err(|e| IoError::written(&self.out, e))?))
    }

    /// Checks that every planned tensor was written, writes `config.json`, the tokenizer and side
    /// files, and puts the folder in place.
    pub fn finish(mut self) -> Result<()> {
        self.flush()?;
        let written_to = |e: IoError| IoError::written(&self.out, e);
        let dir = self.staged.path().to_path_buf();
        self.writer.finish().map_err(written_to)?;
        crate::write_json(&dir.join("config.json"), &self.config).map_err(written_to)?;
        crate::save_hf_files(self.checkpoint, &dir, &self.config).map_err(written_to)?;
        self.staged.commit().map_err(|e| written_to(e.into()))?;
        Ok(())
    }
}

/// Appends float tensor `t` as `entry` (F32, F16 or BF16), converted a slice at a time, so that a
/// large tensor never exists whole in its written type beside its own values.
fn append_float(writer: &mut ShardedWriter, entry: &SafetensorsEntry, t: &Tensor) -> Result<()> {
    let tensor_error = |message: String| IoError::Tensor {
        path: PathBuf::new(),
        tensor: entry.name.clone(),
        message,
    };
    let dtype = match entry.dtype {
        safetensors::Dtype::F32 => DType::F32,
        safetensors::Dtype::F16 => DType::F16,
        safetensors::Dtype::BF16 => DType::BF16,
        other => return Err(tensor_error(format!("{other:?} is not a float type"))),
    };
    if t.dims() != entry.shape.as_slice() {
        return Err(tensor_error(format!(
            "shape {:?}, but the folder plans {:?}",
            t.dims(),
            entry.shape
        )));
    }
    let flat = t.flatten_all().map_err(|e| tensor_error(e.to_string()))?;
    let len = flat.elem_count();
    let mut failure = None;
    let written = writer.append_with(&entry.name, entry.bytes(), &mut |w| {
        for start in (0..len).step_by(SLICE) {
            let slice = flat
                .narrow(0, start, SLICE.min(len - start))
                .and_then(|s| s.to_dtype(dtype))
                .and_then(|s| RawTensor::from_tensor(&s));
            match slice {
                Ok(raw) => w.write_all(&raw.data)?,
                Err(e) => {
                    failure = Some(e);
                    return Err(std::io::Error::other("conversion"));
                }
            }
        }
        Ok(())
    });
    match failure {
        Some(e) => Err(tensor_error(e.to_string())),
        None => written,
    }
}
