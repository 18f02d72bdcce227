//! Writing a quantized model: its linears stored packed at their real bit width, as a GGUF
//! llama.cpp loads (the token embedding and an untied head quantized by round-to-nearest, as
//! `llama-quantize` does) or a Hugging Face folder in compressed-tensors' layout. Post-training
//! quantization, QAT and the search all write through [`write_quantized`].

use crate::{Format, QuantError, QuantPlan, QuantizedModel, Result};
use shrink_io::{Checkpoint, Export, GgufWriteType, IoError, QuantizedBlocks};
use shrink_models::{ActQuant, Transformer};
use std::collections::BTreeMap;
use std::path::Path;

/// How a quantized model is written.
#[derive(Debug, Clone, Copy)]
pub struct QuantizedOutput<'a> {
    pub export: Export,
    /// The plan the linears were quantized by (it fits the embedding's format to its rows).
    pub plan: &'a QuantPlan,
    /// The token embedding and an untied head: `None` f32; `Some(Err(t))` the float type `t`;
    /// `Some(Ok(f))` block format `f`, by round-to-nearest.
    pub embeddings: Option<std::result::Result<Format, GgufWriteType>>,
    /// Dynamic activation quantization recorded in a compressed-tensors config.
    pub activations: Option<ActQuant>,
}

/// What was written.
#[derive(Debug, Clone)]
pub struct Written {
    /// Stored type → number of tensors.
    pub types: BTreeMap<String, usize>,
    /// Bits per weight over the quantized linears.
    pub linear_bits_per_weight: f64,
}

/// Writes `model`, whose linears hold the dequantized values of `result`, with those linears
/// stored packed, to `out` (atomically), with `checkpoint`'s tokenizer and metadata.
pub fn write_quantized(
    checkpoint: &Checkpoint,
    model: &Transformer,
    result: &QuantizedModel,
    output: &QuantizedOutput,
    out: &Path,
) -> Result<Written> {
    let mut blocks = BTreeMap::new();
    let written = |e: IoError| QuantError::Io(IoError::written(out, e));
    match output.export {
        Export::Hf => {
            // What the model holds now (AWQ and SmoothQuant rescale norms too); quantized weights
            // in compressed-tensors' layout, everything else in fp16, under the checkpoint's names.
            let rename = |name: &str| {
                model.checkpoint_name(name).ok_or_else(|| {
                    QuantError::Export(format!(
                        "'{name}': a quantized {:?} is written as GGUF (its checkpoint stores this weight transposed)",
                        model.arch
                    ))
                })
            };
            let mut by_checkpoint = BTreeMap::new();
            for (name, q) in &result.tensors {
                by_checkpoint.insert(rename(name)?, q.clone());
            }
            let hf = crate::compressed_tensors(&by_checkpoint, output.activations)?;
            let mut tensors = model.checkpoint_tensors()?;
            tensors.retain(|name, _| !by_checkpoint.contains_key(name));
            let quantized = Checkpoint {
                tensors,
                ..checkpoint.clone()
            };
            shrink_io::save_hf_with(
                &quantized,
                out,
                shrink_io::SaveDType::F16,
                &hf.tensors,
                Some(&hf.quantization_config),
            )
            .map_err(written)?;
        }
        Export::Gguf => {
            let mut parts = BTreeMap::new();
            for (name, q) in &result.tensors {
                parts.insert(name.clone(), q.to_ggml_blocks()?);
            }
            // Weights the checkpoint stacks (GPT-2's c_attn from q, k, v) stack their blocks'
            // rows too: one GGUF type for all of them.
            for (stored, sources) in model.stacked_weights() {
                let found: Vec<_> = sources.iter().filter_map(|s| parts.remove(s)).collect();
                if found.is_empty() {
                    continue;
                }
                let dtype = found[0].0;
                if found.len() != sources.len() || found.iter().any(|(d, _)| *d != dtype) {
                    return Err(QuantError::Export(format!(
                        "'{stored}' is stored as one GGUF tensor made of {}: quantize them all to the same type",
                        sources.join(", ")
                    )));
                }
                let bytes = found.into_iter().flat_map(|(_, b)| b).collect();
                blocks.insert(stored, QuantizedBlocks { dtype, bytes });
            }
            if let Some(name) = parts.keys().next() {
                return Err(QuantError::Export(format!(
                    "quantized '{name}' is not a linear weight of the model"
                )));
            }
            // The token embedding (and an untied output head) by round-to-nearest, as
            // llama-quantize does.
            let mut weight_type = GgufWriteType::F32;
            match output.embeddings {
                None => {}
                Some(Err(t)) => weight_type = t,
                Some(Ok(format)) => {
                    let tensors = model.named_tensors();
                    for name in [model.embedding_name(), "lm_head.weight".into()] {
                        if let Some(t) = tensors.get(&name) {
                            let (rows, cols) = t.dims2()?;
                            let w: Vec<f32> = t.flatten_all()?.to_vec1()?;
                            let q = crate::rtn_format(
                                &w,
                                rows,
                                cols,
                                &output.plan.fit(format.with_search(false), cols),
                                None,
                                &name,
                            )?;
                            let (dtype, bytes) = q.to_ggml_blocks()?;
                            blocks.insert(name, QuantizedBlocks { dtype, bytes });
                        }
                    }
                }
            }
            // What the model holds now: AWQ has rescaled norms as well as linears.
            let quantized = Checkpoint {
                tensors: model.checkpoint_tensors()?,
                ..checkpoint.clone()
            };
            shrink_io::write_llama_gguf(&quantized, out, weight_type, &blocks).map_err(written)?;
        }
    }
    let weights: f64 = result
        .layers
        .iter()
        .map(|l| (l.shape[0] * l.shape[1]) as f64)
        .sum();
    let linear_bits_per_weight = result
        .layers
        .iter()
        .map(|l| l.bits_per_weight * (l.shape[0] * l.shape[1]) as f64)
        .sum::<f64>()
        / weights.max(1.0);
    let mut types: BTreeMap<String, usize> = BTreeMap::new();
    for l in &result.layers {
        *types.entry(l.format.clone()).or_default() += 1;
    }
    for (name, b) in &blocks {
        if !result.tensors.contains_key(name) {
            *types
                .entry(format!("{:?}", b.dtype).to_lowercase())
                .or_default() += 1;
        }
    }
    Ok(Written {
        types,
        linear_bits_per_weight,
    })
}
