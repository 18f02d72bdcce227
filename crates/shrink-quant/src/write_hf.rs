//! A quantized model's Hugging Face folder in compressed-tensors' layout, written as its blocks
//! are quantized: the shards are planned from the model's names and shapes and the quantization
//! plan (the packed codes' and scales' shapes are known before any block is quantized), then
//! each tensor is appended in order: the embedding, each block's tensors, the rest. The folder is
//! staged and appears under its name when complete. The tensors are those
//! [`crate::write_quantized`] writes; their order in the files is the model's, not sorted.

use crate::{Format, QuantError, QuantizedOutput, QuantizedWeight, Result};
use candle_core::{DType, Tensor};
use shrink_io::{Checkpoint, IoError, RawTensor, SafetensorsEntry, ShardedWriter};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Values converted to fp16 per slice when a float tensor is written (16M: 32 MB of fp16).
const SLICE: usize = 1 << 24;

/// See the module documentation.
pub struct QuantizedHf<'a> {
    staged: shrink_core::AtomicDir,
    writer: ShardedWriter,
    /// The written tensors' names in file order, and the position of each.
    order: Vec<String>,
    position: BTreeMap<String, usize>,
    next: usize,
    pending: BTreeMap<String, Pending>,
    /// The quantized linears' weight names (`….weight`).
    quantized: std::collections::BTreeSet<String>,
    checkpoint: &'a Checkpoint,
    config: serde_json::Value,
    output: &'a QuantizedOutput<'a>,
    out: PathBuf,
}

enum Pending {
    Raw(RawTensor),
    Float(Tensor),
}

/// The block a Llama-family tensor belongs to (`model.layers.N.…`).
fn block_of(name: &str) -> Option<usize> {
    let rest = name.split_once("layers.")?.1;
    rest.split('.').next()?.parse().ok()
}

impl<'a> QuantizedHf<'a> {
    /// Plans the folder of `written` (the model's tensors under the checkpoint's names, their
    /// shapes known without loading them; its config and tokenizer) with `config`'s linears
    /// quantized as `output.plan` says, and stages it beside `out`.
    pub fn create(
        written: &'a Checkpoint,
        config: &shrink_models::ModelConfig,
        output: &'a QuantizedOutput<'a>,
        out: &Path,
    ) -> Result<Self> {
        let n_layers = config.num_hidden_layers;
        let activations = output.activations.is_some();
        let mut modules = BTreeMap::new();
        let mut layouts = BTreeMap::new();
        for (module, [rows, cols]) in config.block_linears() {
            let s = match output.plan.format_for(&module, cols, n_layers) {
                Format::Scheme(s) => s,
                f => {
                    return Err(QuantError::Export(format!(
                        "'{module}': {}",
                        crate::hf_unsupported(&f, activations).unwrap_or_default()
                    )))
                }
            };
            let layout = crate::compressed_layout(&module, &s, rows, cols, activations)
                .ok_or_else(|| {
                    QuantError::Export(format!(
                        "'{module}': {}",
                        crate::hf_unsupported(&Format::Scheme(s), activations).unwrap_or_default()
                    ))
                })?;
            layouts.insert(format!("{module}.weight"), layout);
            modules.insert(module, (s, rows, cols));
        }
        // The embedding, each block's tensors (by name), then the rest.
        let embedding = config.embedding_name();
        let mut names: Vec<&String> = written.tensors.names().collect();
        names.sort_by_key(|n| match (n.as_str() == embedding, block_of(n)) {
            (true, _) => (0, 0, n.as_str()),
            (false, Some(b)) => (1, b, n.as_str()),
            (false, None) => (2, 0, n.as_str()),
        });
        let mut entries = vec![];
        for name in names {
            match layouts.get(name) {
                Some(layout) => entries.extend(layout.iter().cloned()),
                None => entries.push(SafetensorsEntry {
                    name: name.clone(),
                    dtype: safetensors::Dtype::F16,
                    shape: written.tensors.shape(name).unwrap_or(&[]).to_vec(),
                }),
            }
        }
        let order: Vec<String> = entries.iter().map(|e| e.name.clone()).collect();
        let position = order
            .iter()
            .enumerate()
            .map(|(i, n)| (n.clone(), i))
            .collect();
        let quantization_config = crate::quantization_config_of(&modules, output.activations);
        let io = |e: IoError| QuantError::Io(IoError::written(out, e));
        let staged = shrink_core::AtomicDir::new(out).map_err(|e| io(e.into()))?;
        let writer = ShardedWriter::create(staged.path(), entries, shrink_io::MAX_SHARD_BYTES)
            .map_err(io)?;
        Ok(Self {
            staged,
            writer,
            order,
            position,
            next: 0,
            pending: BTreeMap::new(),
            quantized: layouts.into_keys().collect(),
            checkpoint: written,
            config: shrink_io::hf_config(
                written,
                shrink_io::SaveDType::F16,
                Some(&quantization_config),
            ),
            output,
            out: out.to_path_buf(),
        })
    }

    fn io(&self) -> impl Fn(IoError) -> QuantError + '_ {
        |e| QuantError::Io(IoError::written(&self.out, e))
    }

    /// Supplies quantized linears (by weight name).
    pub fn quantized(&mut self, weights: BTreeMap<String, QuantizedWeight>) -> Result<()> {
        for (name, q) in weights {
            let one = BTreeMap::from([(name, q)]);
            let hf = crate::compressed_tensors(&one, self.output.activations)?;
            for (name, t) in hf.tensors {
                self.pending.insert(name, Pending::Raw(t));
            }
        }
        self.flush()
    }

    /// Supplies a tensor that is not a quantized linear (by checkpoint name), written in fp16.
    pub fn tensor(&mut self, name: &str, t: Tensor) -> Result<()> {
        if self.wants(name) {
            self.pending.insert(name.to_string(), Pending::Float(t));
        }
        self.flush()
    }

    /// Whether `name` (a checkpoint name) is still to be supplied as a tensor.
    pub fn wants(&self, name: &str) -> bool {
        !self.quantized.contains(name)
            && self.position.get(name).is_some_and(|&i| i >= self.next)
            && !self.pending.contains_key(name)
    }

    /// Appends every supplied tensor that is next in the files.
    fn flush(&mut self) -> Result<()> {
        while let Some(name) = self.order.get(self.next) {
            let Some(pending) = self.pending.remove(name) else {
                break;
            };
            let name = name.clone();
            match pending {
                Pending::Raw(raw) => self.writer.append(&name, &raw.data),
                Pending::Float(t) => {
                    let flat = t.flatten_all()?;
                    let len = flat.elem_count();
                    let mut failure = None;
                    let written = self.writer.append_with(&name, 2 * len as u64, &mut |w| {
                        for start in (0..len).step_by(SLICE) {
                            let values = flat
                                .narrow(0, start, SLICE.min(len - start))
                                .and_then(|s| s.to_dtype(DType::F16))
                                .and_then(|s| s.to_vec1::<half::f16>());
                            match values {
                                Ok(v) => {
                                    let bytes: Vec<u8> =
                                        v.iter().flat_map(|x| x.to_le_bytes()).collect();
                                    w.write_all(&bytes)?
                                }
                                Err(e) => {
                                    failure = Some(e);
                                    return Err(std::io::Error::other("conversion"));
                                }
                            }
                        }
                        Ok(())
                    });
                    if let Some(e) = failure {
                        return Err(e.into());
                    }
                    written
                }
            }
            .map_err(self.io())?;
            self.next += 1;
        }
        Ok(())
    }

    /// Checks that every tensor was supplied, writes `config.json` (with the
    /// `quantization_config`), the tokenizer and side files, and puts the folder in place.
    pub fn finish(mut self) -> Result<()> {
        self.flush()?;
        if let Some(name) = self.pending.keys().next() {
            return Err(QuantError::Export(format!(
                "'{name}' is not a tensor of the planned folder"
            )));
        }
        let dir = self.staged.path().to_path_buf();
        let io = |e: IoError| QuantError::Io(IoError::written(&self.out, e));
        self.writer.finish().map_err(io)?;
        shrink_io::write_json(&dir.join("config.json"), &self.config).map_err(io)?;
        shrink_io::save_hf_files(self.checkpoint, &dir, &self.config).map_err(io)?;
        self.staged.commit().map_err(|e| io(e.into()))?;
        Ok(())
    }
}
