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

/// The checkpoint's config with the shape of `model` (a possibly pruned model of it).
pub fn config_for(
    checkpoint: &Checkpoint,
    model: &shrink_models::ModelConfig,
) -> serde_json::Value {
    let mut config = checkpoint.config.clone();
    if let Some(map) = config.as_object_mut() {
        for (key, value) in model.shape_json() {
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
        config: config_for(checkpoint, &model.config),
        ..checkpoint.clone()
    };
    match export {
        Export::Gguf => crate::write_llama_gguf(&written, out, dtype, &BTreeMap::new()),
        Export::Hf => crate::save_hf_with(
            &written,
            out,
            SaveDType::of_gguf(dtype),
            &BTreeMap::new(),
            None,
        ),
    }
    .map_err(|e| IoError::written(out, e))
}

/// [`write_model`] for a model supplied block by block: the output of `checkpoint`'s model with
/// the shape of `config`, planned before any data, each tensor written in the file's order as
/// soon as it and those before it are supplied (see [`crate::GgufStream`], [`crate::HfStream`]).
/// The same bytes as [`write_model`] for a GGUF; the same tensors for a folder, in the model's
/// order and in 5 GB shards.
pub enum ModelStream<'a> {
    Gguf(crate::GgufStream),
    Hf(crate::HfStream<'a>),
}

impl crate::TensorSink for ModelStream<'_> {
    type Error = crate::IoError;

    /// Whether `name` (a checkpoint name) is planned and not supplied yet.
    fn wants(&self, name: &str) -> bool {
        match self {
            ModelStream::Gguf(g) => g.wants(name),
            ModelStream::Hf(h) => h.wants(name),
        }
    }

    /// Supplies tensor `name` (a checkpoint name), converted to its planned type.
    fn tensor(&mut self, name: &str, t: candle_core::Tensor) -> Result<()> {
        match self {
            ModelStream::Gguf(g) => g.tensor(name, t),
            ModelStream::Hf(h) => h.tensor(name, t),
        }
    }
}

impl<'a> ModelStream<'a> {
    /// Plans the output at `out` of `written`: `checkpoint` with its config given `config`'s
    /// shape (see [`config_for`]); the caller keeps it alive while the folder is written.
    pub fn create(
        written: &'a Checkpoint,
        config: &shrink_models::ModelConfig,
        export: Export,
        dtype: GgufWriteType,
        out: &Path,
    ) -> Result<Self> {
        Self::resumable(written, config, export, dtype, out, None)
    }

    /// [`ModelStream::create`] for a job that can be resumed: written in `partial` (a file or
    /// folder kept across a kill, in a `shrink_core::ResumeDir`), continuing after the tensors
    /// and bytes a killed run of the same plan recorded there (`(0, 0)`: from the start).
    pub fn resumable(
        written: &'a Checkpoint,
        config: &shrink_models::ModelConfig,
        export: Export,
        dtype: GgufWriteType,
        out: &Path,
        partial: Option<(&Path, usize, u64)>,
    ) -> Result<Self> {
        Ok(match export {
            Export::Gguf => {
                // No tensor recorded: the header is written again, from the start.
                let file = match partial {
                    Some((partial, tensors, bytes)) => {
                        let bytes = if tensors == 0 { 0 } else { bytes };
                        shrink_core::AtomicFile::resume(out, partial, bytes)?
                    }
                    None => shrink_core::AtomicFile::create(out)?,
                };
                let done = partial.map(|(_, tensors, _)| tensors).filter(|&t| t > 0);
                let types = BTreeMap::new();
                ModelStream::Gguf(crate::GgufStream::resumable(
                    written, dtype, &types, file, done,
                )?)
            }
            Export::Hf => {
                let save = SaveDType::of_gguf(dtype);
                let entries =
                    crate::HfStream::model_order(written.tensors.names(), &config.embedding_name())
                        .into_iter()
                        .map(|name| crate::SafetensorsEntry {
                            dtype: save.safetensors(),
                            shape: written.tensors.shape(&name).unwrap_or(&[]).to_vec(),
                            name,
                        })
                        .collect();
                let hf_config = crate::hf_config(written, save, None);
                let partial = partial.map(|(partial, tensors, _)| (partial, tensors));
                ModelStream::Hf(crate::HfStream::resumable(
                    written, entries, hf_config, out, partial,
                )?)
            }
        })
    }

    /// A point to resume from ([`crate::GgufStream::checkpoint`],
    /// [`crate::HfStream::checkpoint`]).
    pub fn checkpoint(&mut self) -> Result<Option<(usize, u64)>> {
        match self {
            ModelStream::Gguf(g) => g.checkpoint(),
            ModelStream::Hf(h) => h.checkpoint(),
        }
    }

    /// Checks that every planned tensor was supplied and puts the output in place.
    pub fn finish(self) -> Result<()> {
        match self {
            ModelStream::Gguf(g) => g.finish(),
            ModelStream::Hf(h) => h.finish(),
        }
    }
}
