//! Helpers shared by the end-to-end test binaries (each uses some of them).
#![allow(dead_code)]

pub mod real;

use shrink_io::{Checkpoint, Format, GgufVocab, GgufWriteType, TokenizerBundle};
use shrink_models::{ModelConfig, Transformer};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn shrink(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_shrink"))
        .args(args)
        .env(
            "SHRINK_CACHE_DIR",
            std::env::temp_dir().join("shrink-cli-test-cache"),
        )
        .output()
        .expect("the shrink binary runs")
}

pub fn ok(args: &[&str]) -> String {
    let out = shrink(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "shrink {args:?} failed:\n{stderr}");
    String::from_utf8(out.stdout).unwrap()
}

/// Runs a command that must fail cleanly; returns its stderr.
pub fn fails(args: &[&str]) -> String {
    let out = shrink(args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(1),
        "shrink {args:?} should exit 1:\n{stderr}"
    );
    assert!(
        !stderr.contains("panicked"),
        "shrink {args:?} panicked:\n{stderr}"
    );
    assert!(stderr.starts_with("error: "), "{stderr}");
    stderr
}

pub fn sample_text() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../datasets/samples/tempest_excerpt.txt")
}

/// A 2-block GQA model with a byte-level tokenizer, written as a GGUF.
pub fn tiny_gguf(dir: &Path) -> PathBuf {
    let vocab = GgufVocab::byte_level(
        &["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        &["Ġ t", "h e", "Ġt he"],
        Some("smollm"),
    );
    let mut cfg = ModelConfig::tiny_for_tests();
    cfg.vocab_size = vocab.tokens.len();
    // Rows of 32 (whole Q4_0 groups) and 256 (one k-quant super-block, in down_proj).
    cfg.intermediate_size = 256;
    let model = Transformer::random(&cfg, 5, &candle_core::Device::Cpu).unwrap();
    let template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}<|im_start|>assistant\n";
    let tokenizer = TokenizerBundle::from_gguf_vocab(
        Path::new("tiny"),
        vocab,
        Some(1),
        Some(2),
        false,
        Some(template.into()),
    )
    .unwrap();
    let checkpoint = Checkpoint {
        path: "tiny".into(),
        format: Format::HfFolder,
        config: serde_json::to_value(&cfg).unwrap(),
        tensors: model.named_tensors().into(),
        tokenizer: Some(tokenizer),
        generation_config: None,
        side_files: Default::default(),
    };
    let path = dir.join("tiny.gguf");
    shrink_io::write_llama_gguf(&checkpoint, &path, GgufWriteType::F32, &Default::default())
        .unwrap();
    path
}

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
    random_folder(&dir.join("gpt2"), &cfg, vocab, Some(0), 8)
}

/// A 2-block Llama with `vocab_size` embedding rows, written as a Hugging Face folder (with a
/// byte-level tokenizer that a test may replace).
pub fn tiny_llama_folder(dir: &Path, vocab_size: usize) -> PathBuf {
    let mut cfg = ModelConfig::tiny_for_tests();
    cfg.vocab_size = vocab_size;
    let vocab = GgufVocab::byte_level(&["<|endoftext|>"], &[], Some("gpt-2"));
    random_folder(&dir.join("llama"), &cfg, vocab, None, 9)
}

/// A 2-block Qwen3 (QK-norm) or a 6-block Gemma 3 (sandwich norms stored as `w`, GeGLU, the
/// embedding scaled, five sliding-window layers of 100 positions with RoPE base 10,000 and a
/// global one), with a byte-level BPE tokenizer, written as a Hugging Face folder.
pub fn tiny_family_folder(dir: &Path, family: &str) -> PathBuf {
    let vocab = GgufVocab::byte_level(&["<|endoftext|>"], &["Ġ t", "h e", "Ġt he"], Some("gpt-2"));
    let mut cfg = match family {
        "qwen3" => ModelConfig {
            head_dim: Some(16), // o_proj rows of 64: whole Q8_0 blocks
            ..ModelConfig::tiny_qwen3_for_tests()
        },
        "gemma3" => {
            let mut cfg = ModelConfig::tiny_gemma3_for_tests();
            cfg.num_hidden_layers = 6;
            cfg.layer_types = None; // llama.cpp's default: every 6th layer global
            cfg.sliding_window = Some(100);
            cfg.query_pre_attn_scalar = cfg.head_dim.map(|d| d as f64);
            cfg
        }
        other => panic!("no tiny {other}"),
    };
    cfg.vocab_size = vocab.tokens.len();
    cfg.intermediate_size = 128;
    cfg.max_position_embeddings = 1024;
    random_folder(&dir.join(family), &cfg, vocab, None, 21)
}

/// A model of `cfg` with random weights (`seed`) and `vocab`, saved as a Hugging Face folder at
/// `path` in the family's own tensor layout.
fn random_folder(
    path: &Path,
    cfg: &ModelConfig,
    vocab: GgufVocab,
    bos: Option<u32>,
    seed: u64,
) -> PathBuf {
    let model = Transformer::random(cfg, seed, &candle_core::Device::Cpu).unwrap();
    let tokenizer =
        TokenizerBundle::from_gguf_vocab(Path::new("tiny"), vocab, bos, Some(0), false, None)
            .unwrap();
    let checkpoint = Checkpoint {
        path: path.to_path_buf(),
        format: Format::HfFolder,
        config: cfg.to_json().unwrap(),
        tensors: model.checkpoint_tensors().unwrap().into(),
        tokenizer: Some(tokenizer),
        generation_config: None,
        side_files: Default::default(),
    };
    shrink_io::save_hf(&checkpoint, path, shrink_io::SaveDType::F32).unwrap();
    path.to_path_buf()
}
