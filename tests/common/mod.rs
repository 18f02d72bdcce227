//! Helpers shared by the end-to-end test binaries.

use shrink_io::{Checkpoint, Format, GgufVocab, TokenizerBundle};
use shrink_models::{ModelConfig, Transformer};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Renders `html` in headless Chromium with `scripts/check-report.sh` (charts and tables present,
/// a substantial screenshot at `shot`) and asserts it passed. Returns false, checking nothing, when
/// Debian's chromium is not installed.
pub fn check_report_renders(html: &Path, shot: &Path) -> bool {
    if !Path::new("/usr/bin/chromium").exists() {
        return false;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/check-report.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg(html)
        .arg(shot)
        .output()
        .expect("bash runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    true
}

/// A 2-block GPT-2 with a byte-level BPE tokenizer, written as a Hugging Face folder in GPT-2's
/// own layout (Conv1D weights, fused c_attn, `n_embd`-style config), with `positions` positions.
pub fn tiny_gpt2_folder(dir: &Path, positions: usize) -> PathBuf {
    let vocab = GgufVocab::byte_level(&["<|endoftext|>"], &["Ġ t", "h e", "Ġt he"], Some("gpt-2"));
    let mut cfg = ModelConfig::tiny_gpt2_for_tests();
    cfg.vocab_size = vocab.tokens.len();
    cfg.intermediate_size = 128;
    cfg.max_position_embeddings = positions;
    let model = Transformer::random(&cfg, 8, &candle_core::Device::Cpu).unwrap();
    let tokenizer = TokenizerBundle::from_gguf_vocab(
        Path::new("tiny-gpt2"),
        vocab,
        Some(0),
        Some(0),
        false,
        None,
    )
    .unwrap();
    let checkpoint = Checkpoint {
        path: "tiny-gpt2".into(),
        format: Format::HfFolder,
        config: cfg.to_json().unwrap(),
        tensors: model.checkpoint_tensors().unwrap(),
        tokenizer: Some(tokenizer),
        generation_config: None,
        side_files: Default::default(),
    };
    let path = dir.join("gpt2");
    shrink_io::save_hf(&checkpoint, &path, shrink_io::SaveDType::F32).unwrap();
    path
}
