//! Fixtures for tests, built only for tests (`cfg(test)`) and with the `testing` feature, which the
//! workspace's crates enable in their dev-dependencies: not part of the library's API.

use crate::{Checkpoint, GgufVocab, GgufWriteType, IoError, Result, SaveDType, TokenizerBundle};
use shrink_models::{ModelConfig, Transformer};
use std::path::{Path, PathBuf};

/// The inputs of a test that compares a streamed job with the whole-model path: a tiny untied
/// Llama (MLP 64, a byte-level vocabulary) of random weights, written to a folder as an F16 GGUF
/// and as a bf16 safetensors folder, and four calibration windows of 16 tokens.
pub struct TinyStreamable {
    pub config: ModelConfig,
    /// `in.gguf`, F16.
    pub gguf: PathBuf,
    /// `in-hf/`, bf16.
    pub hf: PathBuf,
    pub windows: Vec<Vec<u32>>,
}

/// Writes [`TinyStreamable`]'s model, of weights drawn from `seed`, to `dir`.
pub fn tiny_streamable(seed: u64, dir: &Path) -> Result<TinyStreamable> {
    let vocab = GgufVocab::byte_level(&["<s>", "</s>"], &["a b", "ab c"], Some("llama-bpe"));
    let mut config = ModelConfig::tiny_for_tests();
    config.intermediate_size = 64;
    config.vocab_size = vocab.tokens.len();
    config.tie_word_embeddings = false;
    let model = Transformer::random(&config, seed, &candle_core::Device::Cpu)?;
    let tokenizer =
        TokenizerBundle::from_gguf_vocab(Path::new("t"), vocab, Some(0), Some(1), true, None)?;
    let source = Checkpoint {
        path: "tiny".into(),
        format: crate::Format::HfFolder,
        config: serde_json::to_value(&config).map_err(|e| IoError::Export(e.to_string()))?,
        tensors: model.checkpoint_tensors()?.into(),
        tokenizer: Some(tokenizer),
        generation_config: None,
        side_files: Default::default(),
    };
    let gguf = dir.join("in.gguf");
    crate::write_llama_gguf(&source, &gguf, GgufWriteType::F16, &Default::default())?;
    let hf = dir.join("in-hf");
    crate::save_hf(&source, &hf, SaveDType::BF16)?;
    let windows = (0..4)
        .map(|s| (0..16).map(|i| ((i * 7 + s * 13) % 200) as u32).collect())
        .collect();
    Ok(TinyStreamable {
        config,
        gguf,
        hf,
        windows,
    })
}
