//! End-to-end tests of the `shrink` binary on a tiny model generated here: the main commands work,
//! and every kind of bad input gives a clear message naming the file, tensor or key, a non-zero
//! exit and no panic.

use shrink_io::{Checkpoint, Format, GgufVocab, GgufWriteType, TokenizerBundle};
use shrink_models::{Llama, LlamaConfig};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn shrink(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_shrink"))
        .args(args)
        .env(
            "SHRINK_CACHE_DIR",
            std::env::temp_dir().join("shrink-cli-test-cache"),
        )
        .output()
        .expect("the shrink binary runs")
}

fn ok(args: &[&str]) -> String {
    let out = shrink(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "shrink {args:?} failed:\n{stderr}");
    String::from_utf8(out.stdout).unwrap()
}

/// Runs a command that must fail cleanly; returns its stderr.
fn fails(args: &[&str]) -> String {
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

fn sample_text() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../datasets/samples/tempest_excerpt.txt")
}

/// A 2-block GQA model with a byte-level tokenizer, written as a GGUF.
fn tiny_gguf(dir: &Path) -> PathBuf {
    let vocab = GgufVocab::byte_level(
        &["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        &["Ġ t", "h e", "Ġt he"],
        Some("smollm"),
    );
    let mut cfg = LlamaConfig::tiny_for_tests();
    cfg.vocab_size = vocab.tokens.len();
    cfg.intermediate_size = 64; // whole groups of 32 in every row, for quantization
    let model = Llama::random(&cfg, 5, &candle_core::Device::Cpu).unwrap();
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
        tensors: model.named_tensors(),
        tokenizer: Some(tokenizer),
        generation_config: None,
    };
    let path = dir.join("tiny.gguf");
    shrink_io::write_llama_gguf(&checkpoint, &path, GgufWriteType::F32, &Default::default())
        .unwrap();
    path
}

fn eval_json(model: &str, extra: &[&str]) -> serde_json::Value {
    let text = sample_text();
    let mut args = vec![
        "eval",
        model,
        "--text",
        text.to_str().unwrap(),
        "--ctx",
        "64",
        "--chunks",
        "6",
        "--json",
    ];
    args.extend_from_slice(extra);
    serde_json::from_str(&ok(&args)).unwrap()
}

#[test]
fn inspect_eval_convert_generate_on_a_tiny_model() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = tiny_gguf(dir.path());
    let g = gguf.to_str().unwrap();

    let info: serde_json::Value = serde_json::from_str(&ok(&["inspect", g, "--json"])).unwrap();
    assert_eq!(info["architecture"], "llama");
    assert_eq!(info["tensors"].as_array().unwrap().len(), 2 * 9 + 3);
    assert!(ok(&["inspect", g]).contains("bits/weight    32.000"));

    let report = eval_json(g, &[]);
    assert_eq!(report["schema"], "shrink.eval/v1");
    assert_eq!(report["chunks"], 6);
    assert_eq!(report["tokens_scored"], 6 * 31);
    let ppl = report["perplexity"]["ppl"].as_f64().unwrap();
    // A random model over a 262-token vocabulary: worse than uniform is impossible to beat by much.
    assert!(ppl > 50.0 && ppl < 2000.0, "{ppl}");

    // GGUF -> HF folder -> the same perplexity, and fidelity against the original is perfect.
    let hf = dir.path().join("hf");
    ok(&["convert", g, "--to", "hf", hf.to_str().unwrap()]);
    let back = eval_json(hf.to_str().unwrap(), &["--reference", g]);
    assert!((back["perplexity"]["ppl"].as_f64().unwrap() / ppl - 1.0).abs() < 1e-5);
    assert!(back["fidelity"]["kl_mean"].as_f64().unwrap().abs() < 1e-6);
    assert_eq!(back["fidelity"]["top1_agreement"], 1.0);

    // Q8_0 GGUF: smaller, close to the original.
    let q8 = dir.path().join("q8.gguf");
    ok(&[
        "convert",
        g,
        "--to",
        "gguf",
        q8.to_str().unwrap(),
        "--dtype",
        "q8_0",
    ]);
    assert!(std::fs::metadata(&q8).unwrap().len() < std::fs::metadata(&gguf).unwrap().len());
    let q = eval_json(q8.to_str().unwrap(), &["--reference", g]);
    let kl = q["fidelity"]["kl_mean"].as_f64().unwrap();
    assert!(kl > 0.0 && kl < 1e-2, "{kl}");

    // Human-readable eval, protocol full.
    let text = sample_text();
    let table = ok(&[
        "eval",
        g,
        "--text",
        text.to_str().unwrap(),
        "--ctx",
        "64",
        "--chunks",
        "2",
        "--protocol",
        "full",
    ]);
    assert!(
        table.contains("protocol    full, ctx 64, 2 chunks") && table.contains("tokens/s"),
        "{table}"
    );

    // Generation, greedy and seeded sampling, plain and with the chat template.
    let out = shrink(&["generate", g, "--prompt", "the", "--max-tokens", "5"]);
    assert!(out.status.success());
    let stats = String::from_utf8_lossy(&out.stderr);
    assert!(
        stats.contains("time to first token") && stats.contains("ms/token"),
        "{stats}"
    );
    let sampled = |seed: &str| {
        ok(&[
            "generate",
            g,
            "--prompt",
            "the",
            "--max-tokens",
            "8",
            "--temperature",
            "1",
            "--seed",
            seed,
        ])
    };
    assert_eq!(sampled("7"), sampled("7"));
    assert!(shrink(&[
        "generate",
        g,
        "--prompt",
        "hi",
        "--chat",
        "--max-tokens",
        "3"
    ])
    .status
    .success());
}

#[test]
fn quantize_rtn_and_gptq_write_loadable_smaller_ggufs() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = tiny_gguf(dir.path());
    let g = gguf.to_str().unwrap();
    let text = sample_text();
    let calib = text.to_str().unwrap();
    // `shrink quantize` with the small calibration set every run here uses.
    let quantize = |method: &str, format: &str, out: &Path, extra: &[&str]| -> String {
        let mut args = vec![
            "quantize", g, "--method", method, "--format", format, "--calib", calib,
        ];
        args.extend([
            "--samples",
            "8",
            "--seq-len",
            "64",
            "-o",
            out.to_str().unwrap(),
        ]);
        args.extend_from_slice(extra);
        ok(&args)
    };
    let mut kls = vec![];
    for method in ["rtn", "gptq", "awq", "awq-gptq"] {
        let out = dir.path().join(format!("{method}.gguf"));
        let summary: serde_json::Value =
            serde_json::from_str(&quantize(method, "gguf:q4_0", &out, &["--json"])).unwrap();
        assert_eq!(summary["layers"].as_array().unwrap().len(), 14);
        assert!(
            summary["size_bytes_after"].as_u64().unwrap()
                < summary["size_bytes_before"].as_u64().unwrap()
        );
        assert_eq!(summary["linear_bits_per_weight"], 4.5);
        let info: serde_json::Value =
            serde_json::from_str(&ok(&["inspect", out.to_str().unwrap(), "--json"])).unwrap();
        let q4 = info["tensors"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|t| t["dtype"] == "Q4_0")
            .count();
        assert_eq!(q4, 14);
        let report = eval_json(out.to_str().unwrap(), &["--reference", g]);
        kls.push(report["fidelity"]["kl_mean"].as_f64().unwrap());
        // Same inputs, same seed: the same bytes.
        let again = dir.path().join(format!("{method}-again.gguf"));
        quantize(method, "gguf:q4_0", &again, &[]);
        assert_eq!(
            std::fs::read(&out).unwrap(),
            std::fs::read(&again).unwrap(),
            "{method} is deterministic"
        );
    }
    // Every method stays close to the original; none is far worse than plain RTN (a GGUF whose
    // norms missed AWQ's folding would be).
    eprintln!("KL vs original for rtn, gptq, awq, awq-gptq: {kls:?}");
    assert!(
        kls.iter().all(|&kl| kl > 0.0 && kl < 1.5 * kls[0]),
        "{kls:?}"
    );
    // At 8 bits AWQ is nearly lossless, as RTN is, only if the file carries the folded norms too.
    let q8_kl = |method: &str| {
        let out = dir.path().join(format!("{method}-q8.gguf"));
        quantize(method, "gguf:q8_0", &out, &[]);
        eval_json(out.to_str().unwrap(), &["--reference", g])["fidelity"]["kl_mean"]
            .as_f64()
            .unwrap()
    };
    let (rtn8, awq8) = (q8_kl("rtn"), q8_kl("awq"));
    assert!(
        awq8 < 3.0 * rtn8 && awq8 < 1e-4,
        "AWQ Q8_0 KL {awq8} vs RTN Q8_0 {rtn8}"
    );
    let e = fails(&[
        "quantize",
        g,
        "--format",
        "gguf:q3_k",
        "-o",
        dir.path().join("x.gguf").to_str().unwrap(),
    ]);
    assert!(e.contains("gguf:q3_k"), "{e}");
    let e = fails(&[
        "quantize",
        g,
        "--calib",
        calib,
        "--seq-len",
        "100000",
        "-o",
        dir.path().join("x.gguf").to_str().unwrap(),
    ]);
    assert!(e.contains("calibration"), "{e}");
}

#[test]
fn bad_inputs_fail_cleanly_with_named_causes() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = tiny_gguf(dir.path());
    let bytes = std::fs::read(&gguf).unwrap();
    let text = sample_text();
    let text = text.to_str().unwrap();

    let e = fails(&["eval", "/nonexistent/model.gguf", "--text", text]);
    assert!(e.contains("/nonexistent/model.gguf: no such file"), "{e}");

    let cut = dir.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() - 4096]).unwrap();
    let e = fails(&["eval", cut.to_str().unwrap(), "--text", text]);
    assert!(
        e.contains("cut.gguf") && e.contains("tensor '") && e.contains("truncated"),
        "{e}"
    );
    let e = fails(&["inspect", cut.to_str().unwrap()]);
    assert!(e.contains("truncated"), "{e}");

    let arch = dir.path().join("arch.gguf");
    let pos = bytes.windows(5).position(|w| w == b"llama").unwrap();
    let mut patched = bytes.clone();
    patched[pos..pos + 5].copy_from_slice(b"rwkv6");
    std::fs::write(&arch, patched).unwrap();
    let e = fails(&["eval", arch.to_str().unwrap(), "--text", text]);
    assert!(e.contains("unsupported architecture 'rwkv6'"), "{e}");

    // HF folder with a wrong-shaped tensor, a corrupt safetensors file, a bad tokenizer.
    let hf = dir.path().join("hf");
    ok(&[
        "convert",
        gguf.to_str().unwrap(),
        "--to",
        "hf",
        hf.to_str().unwrap(),
    ]);
    let config_path = hf.join("config.json");
    let good_config = std::fs::read_to_string(&config_path).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(&good_config).unwrap();
    cfg["intermediate_size"] = 40.into();
    std::fs::write(&config_path, cfg.to_string()).unwrap();
    let e = fails(&["eval", hf.to_str().unwrap(), "--text", text]);
    assert!(
        e.contains(
            "tensor 'model.layers.0.mlp.gate_proj.weight' has shape [64, 32], expected [40, 32]"
        ),
        "{e}"
    );
    cfg["model_type"] = "mamba".into();
    cfg["architectures"] = serde_json::json!(["MambaForCausalLM"]);
    std::fs::write(&config_path, cfg.to_string()).unwrap();
    let e = fails(&["eval", hf.to_str().unwrap(), "--text", text]);
    assert!(
        e.contains("unsupported architecture 'mamba'") && e.contains("hf"),
        "{e}"
    );
    std::fs::write(&config_path, &good_config).unwrap();

    let st = hf.join("model.safetensors");
    let full = std::fs::read(&st).unwrap();
    std::fs::write(&st, &full[..full.len() - 100]).unwrap();
    let e = fails(&["eval", hf.to_str().unwrap(), "--text", text]);
    assert!(
        e.contains("model.safetensors") && e.contains("truncated"),
        "{e}"
    );
    std::fs::write(&st, &full).unwrap();

    std::fs::write(hf.join("tokenizer.json"), "{ broken").unwrap();
    let e = fails(&["eval", hf.to_str().unwrap(), "--text", text]);
    assert!(e.contains("tokenizer.json"), "{e}");

    // Bad arguments and data references.
    let g = gguf.to_str().unwrap();
    let e = fails(&["eval", g, "--text", "nosuchdata:eval"]);
    assert!(e.contains("unknown dataset or model 'nosuchdata'"), "{e}");
    let e = fails(&["eval", g, "--text", "shakespeare:train"]);
    assert!(e.contains("no split or file named 'train'"), "{e}");
    let e = fails(&["eval", g, "--text", text, "--protocol", "strided"]);
    assert!(e.contains("unknown protocol 'strided'"), "{e}");
    let e = fails(&["eval", g, "--text", text, "--ctx", "4096"]);
    assert!(e.contains("needs at least 8192"), "{e}");
    let e = fails(&["eval", "llama-70b", "--text", text]);
    assert!(
        e.contains("llama-70b") && e.contains("nor a known model"),
        "{e}"
    );
    let e = fails(&[
        "convert",
        g,
        "--to",
        "hf",
        dir.path().join("x").to_str().unwrap(),
        "--dtype",
        "q8_0",
    ]);
    assert!(e.contains("--dtype q8_0 is for --to gguf"), "{e}");
}
