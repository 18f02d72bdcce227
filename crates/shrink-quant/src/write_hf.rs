//! A quantized model's Hugging Face folder in compressed-tensors' layout, written as its blocks
//! are quantized: the shards are planned from the model's names and shapes and the quantization
//! plan (the packed codes' and scales' shapes are known before any block is quantized), then
//! each tensor is appended in order: the embedding, each block's tensors, the rest. The folder is
//! staged and appears under its name when complete. The tensors are those
//! [`crate::write_quantized`] writes; their order in the files is the model's, not sorted.

use crate::{Format, QuantError, QuantizedOutput, QuantizedWeight, Result};
use candle_core::Tensor;
use shrink_io::{Checkpoint, HfStream, SafetensorsEntry};
use std::collections::BTreeMap;
use std::path::Path;

/// See the module documentation.
pub struct QuantizedHf<'a> {
    stream: HfStream<'a>,
    /// The quantized linears' weight names (`….weight`).
    quantized: std::collections::BTreeSet<String>,
    output: &'a QuantizedOutput<'a>,
}

impl<'a> QuantizedHf<'a> {
    /// Plans the folder of `written` (the model's tensors under the checkpoint's names, their
    /// shapes known without loading them; its config and tokenizer) with `config`'s linears
    /// quantized as `output.plan` says, and stages it beside `out` — or, for a job that can be
    /// resumed, in `partial` (a folder kept across a kill), continuing after the tensors a killed
    /// run of the same plan recorded there ([`HfStream::resumable`]).
    pub fn create(
        written: &'a Checkpoint,
        config: &shrink_models::ModelConfig,
        output: &'a QuantizedOutput<'a>,
        out: &Path,
        partial: Option<(&Path, usize)>,
    ) -> Result<Self> {
        let n_layers = config.num_hidden_layers;
        let activations = output.plan.activations.is_some();
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
        let mut entries = vec![];
        for name in HfStream::model_order(written.tensors.names(), &config.embedding_name()) {
            match layouts.get(&name) {
                Some(layout) => entries.extend(layout.iter().cloned()),
                None => entries.push(SafetensorsEntry {
                    dtype: safetensors::Dtype::F16,
                    shape: written.tensors.shape(&name).unwrap_or(&[]).to_vec(),
                    name,
                }),
            }
        }
        let kept = written
            .tensors
            .names()
            .filter(|n| !layouts.contains_key(*n));
        let ignore = config
            .hf_linear_modules(kept.filter_map(|n| Some((n.as_str(), written.tensors.shape(n)?))));
        let quantization_config =
            crate::quantization_config_of(&modules, output.plan.activations.as_ref(), ignore);
        let config = shrink_io::hf_config(
            written,
            shrink_io::SaveDType::F16,
            Some(&quantization_config),
        );
        Ok(Self {
            stream: HfStream::resumable(written, entries, config, out, partial)?,
            quantized: layouts.into_keys().collect(),
            output,
        })
    }

    /// Supplies quantized linears (by weight name).
    pub fn quantized(&mut self, weights: BTreeMap<String, QuantizedWeight>) -> Result<()> {
        for (name, q) in weights {
            let one = BTreeMap::from([(name, q)]);
            let hf =
                crate::compressed_tensors(&one, self.output.plan.activations.as_ref(), vec![])?;
            for (name, t) in hf.tensors {
                self.stream.raw(&name, t)?;
            }
        }
        Ok(())
    }

    /// Supplies a tensor that is not a quantized linear (by checkpoint name), written in fp16.
    pub fn tensor(&mut self, name: &str, t: Tensor) -> Result<()> {
        if self.wants(name) {
            self.stream.tensor(name, t)?;
        }
        Ok(())
    }

    /// Whether `name` (a checkpoint name) is still to be supplied as a tensor.
    pub fn wants(&self, name: &str) -> bool {
        !self.quantized.contains(name) && self.stream.wants(name)
    }

    /// A point to resume from ([`HfStream::checkpoint`]).
    pub fn checkpoint(&mut self) -> Result<Option<(usize, u64)>> {
        Ok(self.stream.checkpoint()?)
    }

    /// Checks that every tensor was supplied, writes `config.json` (with the
    /// `quantization_config`), the tokenizer and side files, and puts the folder in place.
    pub fn finish(self) -> Result<()> {
        Ok(self.stream.finish()?)
    }
}
