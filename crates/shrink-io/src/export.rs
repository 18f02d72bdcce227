//! Writing a model from memory: where it goes ([`Export`]), whether it can go there
//! ([`check_export`]) and the float writer ([`write_model`]) that pruning and distillation use.
//! Quantized models are written by `shrink-quant`'s writer, which packs the linears first.

use crate::{Checkpoint, GgufWriteType, IoError, Result, SaveDType};
use serde::Serialize;
use shrink_models::Transformer;
use std::collections::BTreeMap;
use std::path::Path;

/// Where a written model goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Export {
    /// A GGUF file llama.cpp loads.
    Gguf,
    /// A Hugging Face folder (compressed-tensors' layout when quantized).
    Hf,
}

impl Export {
    /// `gguf` or `hf`, as configs, flags and plans write it.
    pub fn name(self) -> &'static str {
        match self {
            Export::Gguf => "gguf",
            Export::Hf => "hf",
        }
    }
}

/// Refuses, before any work, an export the model cannot have: shrink writes encoders as Hugging
/// Face folders only (llama.cpp's BERT GGUF needs a WordPiece vocabulary it does not write), and
/// a GGUF needs a vocabulary shrink can write from `checkpoint`'s tokenizer.
pub fn check_export(
    checkpoint: &Checkpoint,
    arch: shrink_models::Arch,
    export: Export,
) -> Result<()> {
    if export != Export::Gguf {
        return Ok(());
    }
    if arch.is_encoder() {
        return Err(IoError::Export(format!(
            "{arch:?} encoders are written as Hugging Face folders: use --format hf (pipeline stages: format = \"hf\")"
        )));
    }
    crate::gguf_vocab_of(checkpoint)?;
    Ok(())
}

/// The checkpoint's config with the model's (possibly pruned) shape.
pub fn config_for(checkpoint: &Checkpoint, model: &Transformer) -> serde_json::Value {
    let mut config = checkpoint.config.clone();
    if let Some(map) = config.as_object_mut() {
        for (key, value) in model.config.shape_json() {
            map.insert(key.into(), value);
        }
    }
    config
}

/// Writes `model` to `out` as a GGUF or a Hugging Face folder in float type `dtype`, with
/// `checkpoint`'s tokenizer and metadata and the model's own shape in the config.
pub fn write_model(
    checkpoint: &Checkpoint,
    model: &Transformer,
    export: Export,
    dtype: GgufWriteType,
    out: &Path,
) -> Result<()> {
    let written = Checkpoint {
        tensors: model.checkpoint_tensors()?.into(),
        config: config_for(checkpoint, model),
        ..checkpoint.clone()
    };
    match export {
        Export::Gguf => crate::write_llama_gguf(&written, out, dtype, &BTreeMap::new()),
        Export::Hf => {
            let dtype = match dtype {
                GgufWriteType::F16 => SaveDType::F16,
                _ => SaveDType::F32,
            };
            crate::save_hf_with(&written, out, dtype, &BTreeMap::new(), None)
        }
    }
    .map_err(|e| IoError::written(out, e))
}
