//! End-to-end tests of the `shrink` binary on a tiny model generated here: the main commands work,
//! and every kind of bad input gives a clear message naming the file, tensor or key, a non-zero
//! exit and no panic.

mod common;

use common::{fails, ok, sample_text, shrink, tiny_gguf};
use std::path::{Path, PathBuf};
use std::process::Command;

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
    // Its Q8_0 weights multiply as llama.cpp's (8-bit activations, integer products, f16 keys and
    // values): the same figures read block by block; `--dequantize` multiplies f32 weights.
    let q8s = q8.to_str().unwrap();
    let streamed = eval_json(q8s, &["--reference", g, "--stream"]);
    assert_eq!(
        (&streamed["perplexity"], &streamed["fidelity"]),
        (&q["perplexity"], &q["fidelity"])
    );
    let float = eval_json(q8s, &["--reference", g, "--dequantize"]);
    assert_ne!(float["perplexity"]["ppl"], q["perplexity"]["ppl"]);
    assert!(float["fidelity"]["kl_mean"].as_f64().unwrap() < kl);

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
    for method in ["rtn", "gptq", "awq", "awq-gptq", "signround"] {
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
    eprintln!("KL vs original for rtn, gptq, awq, awq-gptq, signround: {kls:?}");
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
    assert!(
        e.contains("model.layers.0.self_attn.q_proj") && e.contains("multiple of 256"),
        "{e}"
    );
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
fn presets_kquants_and_hugging_face_exports() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = tiny_gguf(dir.path());
    let g = gguf.to_str().unwrap();
    let text = sample_text();
    let calib = text.to_str().unwrap();
    let quantize = |out: &Path, extra: &[&str]| -> serde_json::Value {
        let mut args = vec!["quantize", g, "--calib", calib, "--samples", "8"];
        args.extend(["--seq-len", "64", "-o", out.to_str().unwrap(), "--json"]);
        args.extend_from_slice(extra);
        serde_json::from_str(&ok(&args)).unwrap()
    };
    let dtypes = |path: &Path| -> std::collections::BTreeMap<String, usize> {
        let info: serde_json::Value =
            serde_json::from_str(&ok(&["inspect", path.to_str().unwrap(), "--json"])).unwrap();
        let mut counts = std::collections::BTreeMap::new();
        for t in info["tensors"].as_array().unwrap() {
            if t["shape"].as_array().unwrap().len() == 2 {
                *counts
                    .entry(t["dtype"].as_str().unwrap().to_string())
                    .or_default() += 1;
            }
        }
        counts
    };
    let kl = |path: &Path| -> f64 {
        eval_json(path.to_str().unwrap(), &["--reference", g])["fidelity"]["kl_mean"]
            .as_f64()
            .unwrap()
    };
    // llama.cpp's Q4_K_M choice on 2 layers: attn_v and ffn_down get Q6_K in layer 1 only
    // (use_more_bits), 32-wide rows fall back (Q4_K → Q5_0, Q6_K → Q8_0), the embedding follows
    // the output head (Q6_K → Q8_0). GPTQ writes k-quant blocks llama.cpp's layout reads.
    let q4km = dir.path().join("q4km.gguf");
    let summary = quantize(&q4km, &["--preset", "q4_k_m"]);
    assert_eq!(
        summary["method"].as_str().unwrap().split('(').next(),
        Some("Gptq")
    );
    let want: std::collections::BTreeMap<String, usize> = [
        ("Q4K", 1),
        ("Q5_0", 11),
        ("Q6K", 1),
        ("Q8_0", 3), // attn_v of layer 1, the embedding and the untied output head
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    assert_eq!(dtypes(&q4km), want);
    let again = dir.path().join("q4km-again.gguf");
    quantize(&again, &["--preset", "q4_k_m"]);
    assert_eq!(
        std::fs::read(&q4km).unwrap(),
        std::fs::read(&again).unwrap()
    );
    let q4_0 = dir.path().join("q4_0.gguf");
    quantize(&q4_0, &["--format", "gguf:q4_0", "--method", "gptq"]);
    let (kl_q4km, kl_q4_0) = (kl(&q4km), kl(&q4_0));
    assert!(kl_q4km < kl_q4_0, "Q4_K_M mix {kl_q4km} vs Q4_0 {kl_q4_0}");
    // imatrix-weighted RTN into k-quants.
    let imat = dir.path().join("imatrix.gguf");
    quantize(
        &imat,
        &["--preset", "q4_k_m", "--method", "rtn", "--imatrix"],
    );
    assert_eq!(dtypes(&imat), want);

    // Hugging Face folder in compressed-tensors' layout: int4 groups of 32, packed in int32.
    let hf = dir.path().join("w4-hf");
    let summary = quantize(
        &hf,
        &[
            "--format", "hf", "--bits", "4", "--group", "32", "--method", "gptq",
        ],
    );
    assert_eq!(summary["linear_bits_per_weight"], 4.5);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(hf.join("config.json")).unwrap()).unwrap();
    let qc = &config["quantization_config"];
    assert_eq!(qc["quant_method"], "compressed-tensors");
    assert_eq!(qc["format"], "pack-quantized");
    assert_eq!(qc["config_groups"]["group_0"]["weights"]["group_size"], 32);
    assert_eq!(qc["config_groups"]["group_0"]["weights"]["num_bits"], 4);
    // Targets every Linear; the one left in 16 bits (the head) is ignored by name.
    assert_eq!(
        qc["config_groups"]["group_0"]["targets"],
        serde_json::json!(["Linear"])
    );
    assert_eq!(qc["ignore"], serde_json::json!(["lm_head"]));
    let types = dtypes(&hf);
    assert_eq!(types.get("I32 (int4 packed)"), Some(&14), "{types:?}");
    let kl_hf = kl(&hf);
    assert!(kl_hf > 0.0 && kl_hf < 2.0 * kl_q4_0, "{kl_hf} vs {kl_q4_0}");

    // W8A8: SmoothQuant, int8 per-channel weights, int8 per-token activations simulated on load.
    let w8a8 = dir.path().join("w8a8");
    let summary = quantize(&w8a8, &["--preset", "w8a8"]);
    assert!(summary["method"]
        .as_str()
        .unwrap()
        .starts_with("SmoothQuant"));
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(w8a8.join("config.json")).unwrap()).unwrap();
    let qc = &config["quantization_config"];
    assert_eq!(qc["format"], "int-quantized");
    // The preset keeps down_proj's inputs in 16 bits: its own group, without input activations.
    let groups = qc["config_groups"].as_object().unwrap();
    assert_eq!(groups.len(), 2, "{qc}");
    for g in groups.values() {
        let targets = g["targets"].as_array().unwrap();
        let down = targets
            .iter()
            .filter(|t| t.as_str().unwrap().ends_with("down_proj"));
        if down.count() == targets.len() {
            assert!(g["input_activations"].is_null(), "{g}");
        } else {
            assert!(targets
                .iter()
                .all(|t| !t.as_str().unwrap().contains("down_proj")));
            assert_eq!(g["input_activations"]["strategy"], "token", "{g}");
        }
    }
    // Every input in int8 (a pattern matching no linear), and none: the same weights (GPTQ does
    // not see the activations' rounding), so the scores differ only by what the loader rounds.
    let all_a8 = dir.path().join("w8a8-all");
    quantize(
        &all_a8,
        &["--preset", "w8a8", "--activations-except", "none-such"],
    );
    let w8 = dir.path().join("w8a16");
    quantize(&w8, &["--preset", "w8a8", "--activations", "none"]);
    let (kl_all, kl_w8a8, kl_w8) = (kl(&all_a8), kl(&w8a8), kl(&w8));
    assert!(
        kl_w8 < 1e-3,
        "W8 weights alone are nearly lossless: {kl_w8}"
    );
    assert!(
        kl_all > kl_w8a8 && kl_w8a8 > kl_w8 && kl_all < 0.05,
        "int8 activations add a little error, less without down_proj's: {kl_all} vs {kl_w8a8} vs {kl_w8}"
    );
    // Read block by block, a folder and its reference score as built whole, to the bit; int8
    // activations, which only the model built whole applies, are refused.
    let scores = |extra: &[&str]| {
        let mut args = vec!["--reference", g];
        args.extend_from_slice(extra);
        let r = eval_json(w8.to_str().unwrap(), &args);
        (r["perplexity"].clone(), r["fidelity"].clone())
    };
    assert_eq!(scores(&["--stream"]), scores(&[]));
    let e = fails(&["eval", w8a8.to_str().unwrap(), "--text", calib, "--stream"]);
    assert!(e.contains("without int8 activations"), "{e}");

    // What the formats cannot hold is refused by name.
    let e = fails(&[
        "quantize",
        g,
        "--method",
        "rtn",
        "--format",
        "hf",
        "--bits",
        "5",
        "--group",
        "32",
        "-o",
        dir.path().join("x").to_str().unwrap(),
    ]);
    assert!(e.contains("4- or 8-bit"), "{e}");
    let e = fails(&[
        "quantize",
        g,
        "--format",
        "gguf:q4_0",
        "--bits",
        "8",
        "-o",
        dir.path().join("x.gguf").to_str().unwrap(),
    ]);
    assert!(e.contains("do not describe gguf:q4_0"), "{e}");
    let bad = dir.path().join("bad-preset.toml");
    std::fs::write(
        &bad,
        "description = \"x\"\nmethod = \"gptq\"\nformat = \"q4_k\"\nexport = \"gguf\"\n[[rule]]\nmatch = \"v_proj\"\nformat = \"q7_k\"\n",
    )
    .unwrap();
    let e = fails(&[
        "quantize",
        g,
        "--preset",
        bad.to_str().unwrap(),
        "-o",
        dir.path().join("x.gguf").to_str().unwrap(),
    ]);
    assert!(e.contains("bad-preset.toml") && e.contains("q7_k"), "{e}");
}

#[test]
fn every_example_pipeline_validates_and_bad_ones_say_where() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../pipelines");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let out = ok(&["validate", path.to_str().unwrap()]);
            assert!(out.contains(": valid"), "{out}");
            let plan: serde_json::Value =
                serde_json::from_str(&ok(&["validate", path.to_str().unwrap(), "--json"])).unwrap();
            assert!(!plan["stages"].as_array().unwrap().is_empty());
            n += 1;
        }
    }
    assert!(n >= 2, "pipelines/ holds {n} pipelines");
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("bad.toml");
    std::fs::write(
        &bad,
        "name = \"x\"\n[model]\nsource = \"smollm2\"\n[[stage]]\nkind = \"quantize.gptq\"\nprest = \"q4_k_m\"\n",
    )
    .unwrap();
    let e = fails(&["validate", bad.to_str().unwrap()]);
    assert!(
        e.contains("bad.toml:6:1: unknown key `prest`; did you mean `preset`?"),
        "{e}"
    );
    // Search stages: the budget, its targets and the candidate formats are checked up front.
    let search = |rest: &str| {
        std::fs::write(
            &bad,
            format!(
                "name = \"x\"\n[model]\nsource = \"smollm2\"\n[[stage]]\nkind = \"search\"\n{rest}"
            ),
        )
        .unwrap();
        fails(&["validate", bad.to_str().unwrap()])
    };
    let e = search("formats = [\"q4_0\"]\n");
    assert!(e.contains("needs a [stage.budget] table"), "{e}");
    let e = search("[stage.budget]\nmax_size_mb = 90\ntarget_bpw = 4.5\n");
    assert!(e.contains("exactly one of max_size_mb, target_bpw"), "{e}");
    let e = search("formats = [\"q4_x\"]\n[stage.budget]\nmax_size_mb = 90\n");
    assert!(e.contains("formats") && e.contains("q4_x"), "{e}");
    let e = search("[stage.budget]\nmax_size_mb = -1\n");
    assert!(e.contains("budget.max_size_mb = -1"), "{e}");
    let e = search("preset = \"q4_0\"\n[stage.budget]\nmax_size_mb = 90\n");
    assert!(
        e.contains("`preset` does not apply to a search stage"),
        "{e}"
    );
    let e = search("[stage.budget]\nmax_size_mb = 90\nmax_sise = 3\n");
    assert!(e.contains("max_sise"), "{e}");
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
            "tensor 'model.layers.0.mlp.gate_proj.weight' has shape [256, 32], expected [40, 32]"
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
    let e = fails(&["eval", g, "--text", "shakespeare:test"]);
    assert!(e.contains("no split or file named 'test'"), "{e}");
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

/// A small pipeline on the tiny model: GPTQ into the Q4_K_M mix (GGUF), int8 per-channel RTN to a
/// compressed-tensors folder, and a sweep of the latter's bits.
fn tiny_pipeline(dir: &Path, gates: &str) -> PathBuf {
    let gguf = tiny_gguf(dir);
    let text = sample_text();
    let text = text.to_str().unwrap();
    let toml = format!(
        r#"name = "tiny"
seed = 3
[model]
source = "{model}"
[data]
calib = "{text}"
eval = "{text}"
samples = 8
seq_len = 64
[[stage]]
kind = "quantize.gptq"
name = "gptq"
preset = "q4_k_m"
[[stage]]
kind = "quantize.rtn"
name = "int8"
input = "model"
format = "hf"
bits = 8
group = "channel"
[eval]
ctx = 64
chunks = 6
prompts = ["To be, or not", "The tempest"]
max_new_tokens = 6
prefill_tokens = 24
decode_tokens = 6
[export]
formats = ["gguf", "hf"]
[sweep]
stage = "int8"
key = "bits"
values = [4, 8]
[gates]
{gates}
"#,
        model = gguf.display()
    );
    let path = dir.join(format!("tiny-{}.toml", toml.len()));
    std::fs::write(&path, toml).unwrap();
    path
}

/// Every file under `dir` (relative name → bytes), for comparing runs byte for byte.
fn tree_bytes(dir: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(dir).unwrap().display().to_string();
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

/// The artifacts of a run folder: every stage's model and the exported model/.
fn artifacts(run: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    tree_bytes(run)
        .into_iter()
        .filter(|(k, _)| k.starts_with("model/") || k.contains("/model"))
        .collect()
}

#[test]
fn pipeline_runs_end_to_end_reuses_stages_and_reports() {
    let dir = tempfile::tempdir().unwrap();
    let file = tiny_pipeline(
        dir.path(),
        "max_ppl_increase_pct = 50.0\nmin_top1_agreement = 0.5",
    );
    let f = file.to_str().unwrap();
    let run = dir.path().join("run");
    let r = run.to_str().unwrap();

    // --dry-run prints the plan, sweep variant included, and runs nothing.
    let plan = ok(&["run", f, "-o", r, "--dry-run"]);
    assert!(
        plan.contains("int8@bits=4") && plan.contains("sweep     int8.bits"),
        "{plan}"
    );
    assert!(!run.exists());

    let summary: serde_json::Value =
        serde_json::from_str(&ok(&["run", f, "-o", r, "--json"])).unwrap();
    assert_eq!(summary["schema"], "shrink.run/v1");
    assert_eq!(summary["passed"], true);
    let names: Vec<&str> = summary["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    // bits = 8 is what the pipeline runs already: only bits = 4 is a new variant.
    assert_eq!(names, ["baseline", "gptq", "int8", "int8@bits=4"]);
    for file in [
        "report.json",
        "report.md",
        "report.html",
        "model/model.gguf",
        "model/hf/config.json",
    ] {
        assert!(run.join(file).exists(), "{file}");
    }
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["schema"], "shrink.report/v1");
    let rows = report["rows"].as_array().unwrap();
    let base = &rows[0];
    assert!(base["kl_mean"].is_null() && base["perplexity"].as_f64().unwrap() > 1.0);
    // The exported GGUF is the GPTQ stage's, scored against the input model.
    assert_eq!(
        std::fs::read(run.join("model/model.gguf")).unwrap(),
        std::fs::read(run.join("stages/gptq/model.gguf")).unwrap()
    );
    let (gptq, int8, int4) = (&rows[1], &rows[2], &rows[3]);
    for row in [gptq, int8, int4] {
        assert!(row["kl_mean"].as_f64().unwrap() > 0.0, "{row}");
        assert!(row["compression_ratio"].as_f64().unwrap() > 1.0, "{row}");
        assert_eq!(row["cached"], false);
        assert!(row["decode"]["decode_ms_per_token"].as_f64().unwrap() > 0.0);
    }
    assert_eq!(gptq["decode"]["backend"], "shrink-integer");
    assert_eq!(int8["decode"]["backend"], "candle-f32");
    assert!(int4["size_bytes"].as_u64() < int8["size_bytes"].as_u64());
    assert!(
        int4["kl_mean"].as_f64() > int8["kl_mean"].as_f64(),
        "fewer bits, more error"
    );
    // Per-layer tables: every linear of both blocks, with its calibrated error.
    let layers = &report["layers"][0];
    assert_eq!(layers["stage"], "gptq");
    assert_eq!(layers["layers"].as_array().unwrap().len(), 14);
    assert!(
        layers["layers"][0]["relative_output_error"]
            .as_f64()
            .unwrap()
            > 0.0
    );
    // Generations from every model, side by side.
    assert_eq!(report["generations"].as_array().unwrap().len(), 2);
    assert_eq!(
        report["generations"][0]["outputs"]
            .as_object()
            .unwrap()
            .len(),
        4
    );
    // The Pareto front of the sweep (and the baseline), recomputed here: rows no other row beats
    // on both size and perplexity.
    let swept: Vec<(&str, u64, f64)> = rows
        .iter()
        .filter(|r| r["name"] != "gptq")
        .map(|r| {
            let name = r["name"].as_str().unwrap();
            (
                name,
                r["size_bytes"].as_u64().unwrap(),
                r["perplexity"].as_f64().unwrap(),
            )
        })
        .collect();
    let mut front: Vec<(&str, u64, f64)> = swept
        .iter()
        .copied()
        .filter(|a| {
            !swept
                .iter()
                .any(|b| b.1 <= a.1 && b.2 <= a.2 && (b.1 < a.1 || b.2 < a.2))
        })
        .collect();
    front.sort_by_key(|r| r.1);
    let front: Vec<&str> = front.iter().map(|r| r.0).collect();
    let pareto: Vec<&str> = report["sweep"]["pareto"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(pareto, front);
    assert_eq!(
        report["sweep"]["variants"],
        serde_json::json!(["int8", "int8@bits=4"])
    );
    let p = &report["provenance"];
    assert_eq!(p["seed"], 3);
    assert_eq!(p["inputs"][0]["role"], "model");
    assert_eq!(p["inputs"][0]["sha256"].as_str().unwrap().len(), 64);
    let html = std::fs::read_to_string(run.join("report.html")).unwrap();
    assert!(html.contains("<svg") && html.contains("int8@bits=4"));
    let md = std::fs::read_to_string(run.join("report.md")).unwrap();
    assert!(md.contains("| gptq"), "{md}");

    // A second run reuses every stage and writes the same artifacts.
    let first = artifacts(&run);
    let again: serde_json::Value =
        serde_json::from_str(&ok(&["run", f, "-o", r, "--json"])).unwrap();
    let cached: Vec<bool> = again["models"].as_array().unwrap()[1..]
        .iter()
        .map(|m| m["cached"].as_bool().unwrap())
        .collect();
    assert_eq!(cached, [true, true, true]);
    assert_eq!(artifacts(&run), first);

    // The report renders in a browser (Debian's chromium), when one is installed.
    let shot = dir.path().join("report.png");
    if !common::check_report_renders(&run.join("report.html"), &shot) {
        eprintln!("SKIPPED: chromium is not installed; report.html not rendered");
    }
}

#[test]
fn a_run_killed_mid_stage_resumes_to_the_same_bytes_and_gates_fail_loudly() {
    let dir = tempfile::tempdir().unwrap();
    let file = tiny_pipeline(dir.path(), "max_ppl_increase_pct = 50.0");
    let f = file.to_str().unwrap();
    let whole = dir.path().join("whole");
    ok(&["run", f, "-o", whole.to_str().unwrap()]);

    // Start again elsewhere and SIGKILL the process while a stage is being written.
    let killed = dir.path().join("killed");
    let stages = killed.join("stages");
    let mut child = Command::new(env!("CARGO_BIN_EXE_shrink"))
        .args(["run", f, "-o", killed.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let staging = |d: &Path| -> bool {
        std::fs::read_dir(d).is_ok_and(|mut it| {
            it.any(|e| {
                e.is_ok_and(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .starts_with(".shrink-staging-")
                })
            })
        })
    };
    let start = std::time::Instant::now();
    while !staging(&stages) {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before a stage began"
        );
        assert!(start.elapsed().as_secs() < 120, "no stage started");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(
        staging(&stages),
        "killed while the stage was still in its staging folder"
    );
    assert!(!killed.join("report.json").exists());

    let resumed = ok(&["run", f, "-o", killed.to_str().unwrap()]);
    assert!(resumed.contains("report"), "{resumed}");
    assert!(
        !staging(&stages),
        "the interrupted stage's leftovers are gone"
    );
    assert_eq!(
        artifacts(&killed),
        artifacts(&whole),
        "same bytes as an uninterrupted run"
    );

    // A failed gate: the report is written, the gate is named with its margin, exit code 3.
    let strict = tiny_pipeline(
        dir.path(),
        "max_ppl_increase_pct = 0.0\nmin_compression_ratio = 100.0",
    );
    std::fs::remove_file(whole.join("report.json")).unwrap();
    let out = shrink(&[
        "run",
        strict.to_str().unwrap(),
        "-o",
        whole.to_str().unwrap(),
        "--json",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("quality gates failed") && stderr.contains("min_compression_ratio on gptq"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["passed"], false);
    let failed = summary["failed_gates"].as_array().unwrap();
    assert!(failed.iter().any(|g| g["gate"] == "min_compression_ratio"
        && g["message"].as_str().unwrap().contains("< 100×")));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(whole.join("report.json")).unwrap()).unwrap();
    assert!(report["gates"]
        .as_array()
        .unwrap()
        .iter()
        .any(|g| g["passed"] == false));
}

/// A weight of a model file as rows, by Hugging Face name.
fn weight_rows(model: &Path, name: &str) -> Vec<Vec<f32>> {
    let ck = shrink_io::load(model).unwrap();
    ck.tensors
        .get(name)
        .unwrap()
        .to_dtype(candle_core::DType::F32)
        .unwrap()
        .to_vec2()
        .unwrap()
}

#[test]
fn prune_unstructured_and_structured_write_loadable_models() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = tiny_gguf(dir.path());
    let g = gguf.to_str().unwrap();
    let text = sample_text();
    let calib = text.to_str().unwrap();
    let prune = |out: &Path, args: &[&str]| -> serde_json::Value {
        let mut all = vec![
            "prune",
            g,
            "--calib",
            calib,
            "--samples",
            "8",
            "--seq-len",
            "64",
        ];
        all.extend_from_slice(args);
        all.extend(["-o", out.to_str().unwrap(), "--json"]);
        serde_json::from_str(&ok(&all)).unwrap()
    };
    let base = eval_json(g, &[])["perplexity"]["ppl"].as_f64().unwrap();
    for method in ["magnitude", "wanda", "sparsegpt"] {
        for sparsity in ["0.5", "2:4"] {
            let out = dir
                .path()
                .join(format!("{method}-{}.gguf", sparsity.replace(':', "_")));
            let s = prune(&out, &["--method", method, "--sparsity", sparsity]);
            assert_eq!(s["schema"], "shrink.prune/v1");
            let layers = s["layers"].as_array().unwrap();
            assert_eq!(layers.len(), 14);
            assert!(
                layers.iter().all(|l| l["sparsity"] == 0.5),
                "{method} {sparsity}"
            );
            assert_eq!(s["linear_sparsity"], 0.5);
            assert_eq!(s["parameters_after"], s["parameters_before"]);
            // The file holds the zeros: every group of 4 keeps at most 2 for 2:4.
            let w = weight_rows(&out, "model.layers.1.mlp.up_proj.weight");
            let zeros = w.iter().flatten().filter(|v| **v == 0.0).count();
            assert_eq!(zeros * 2, w.len() * w[0].len());
            if sparsity == "2:4" {
                for row in &w {
                    assert!(row
                        .chunks(4)
                        .all(|g| g.iter().filter(|v| **v != 0.0).count() <= 2));
                }
            }
            let ppl = eval_json(out.to_str().unwrap(), &[])["perplexity"]["ppl"]
                .as_f64()
                .unwrap();
            assert!(ppl.is_finite() && ppl != base, "{method} {sparsity}: {ppl}");
        }
    }
    // Structured: the written model has the new shape in its metadata and loads.
    for (args, key, want) in [
        (
            vec!["--method", "heads", "--fraction", "0.5"],
            "num_attention_heads",
            2,
        ),
        (
            vec![
                "--method",
                "heads",
                "--fraction",
                "0.5",
                "--kv-groups",
                "--importance",
                "magnitude",
            ],
            "num_key_value_heads",
            1,
        ),
        (
            vec!["--method", "channels", "--fraction", "0.25"],
            "intermediate_size",
            192,
        ),
        (
            vec![
                "--method",
                "layers",
                "--fraction",
                "0.5",
                "--criterion",
                "perplexity",
            ],
            "num_hidden_layers",
            1,
        ),
        (
            vec!["--method", "width", "--fraction", "0.25"],
            "hidden_size",
            24,
        ),
    ] {
        for format in ["gguf", "hf"] {
            let out = dir.path().join(format!("{}-{key}.{format}", args[1]));
            let mut a = args.clone();
            a.extend(["--format", format]);
            let s = prune(&out, &a);
            assert_eq!(s["config"][key], want, "{args:?}");
            assert!(s["parameters_after"].as_u64() < s["parameters_before"].as_u64());
            let info: serde_json::Value =
                serde_json::from_str(&ok(&["inspect", out.to_str().unwrap(), "--json"])).unwrap();
            assert_eq!(
                info["parameters"], s["parameters_after"],
                "{args:?} {format}"
            );
            let ppl = eval_json(out.to_str().unwrap(), &[])["perplexity"]["ppl"]
                .as_f64()
                .unwrap();
            assert!(ppl.is_finite(), "{args:?} {format}");
        }
    }
    // Mistakes are refused before any work, naming what is wrong.
    let out = dir.path().join("x.gguf");
    let o = out.to_str().unwrap();
    let e = fails(&["prune", g, "--method", "wanda", "-o", o]);
    assert!(e.contains("needs a sparsity"), "{e}");
    let e = fails(&[
        "prune",
        g,
        "--method",
        "wanda",
        "--sparsity",
        "1.5",
        "-o",
        o,
    ]);
    assert!(e.contains("sparsity '1.5'"), "{e}");
    let e = fails(&[
        "prune",
        g,
        "--method",
        "heads",
        "--sparsity",
        "0.5",
        "-o",
        o,
    ]);
    assert!(e.contains("does not apply to heads"), "{e}");
    let e = fails(&[
        "prune",
        g,
        "--method",
        "magnitude",
        "--sparsity",
        "3:7",
        "-o",
        o,
    ]);
    assert!(
        e.contains("model.layers.0.self_attn.q_proj") && e.contains("groups of 7"),
        "{e}"
    );
    let e = fails(&[
        "prune",
        g,
        "--method",
        "layers",
        "--fraction",
        "1.0",
        "-o",
        o,
    ]);
    assert!(e.contains("fraction 1"), "{e}");
    let e = fails(&[
        "prune",
        g,
        "--method",
        "width",
        "--fraction",
        "0.5",
        "--importance",
        "gradient",
        "-o",
        o,
    ]);
    assert!(e.contains("importance 'gradient'"), "{e}");
    assert!(!out.exists());
}

/// A pipeline's `[model]` and `[data]` on `model` and `text`, and two stages: SparseGPT 2:4
/// (`sparse`), then GPTQ Q4_0 of it (`sparse-q4`).
fn sparse_then_q4(model: &Path, text: &Path) -> String {
    format!(
        r#"[model]
source = "{model}"
[data]
calib = "{text}"
eval = "{text}"
samples = 8
seq_len = 64
[[stage]]
kind = "prune.sparsegpt"
name = "sparse"
sparsity = "2:4"
[[stage]]
kind = "quantize.gptq"
name = "sparse-q4"
format = "q4_0"
"#,
        model = model.display(),
        text = text.display()
    )
}

#[test]
fn a_pipeline_evaluated_block_by_block_reports_the_same_figures() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = tiny_gguf(dir.path());
    let text = sample_text();
    let pipeline = |stream: &str, extra: &str| {
        let toml = format!(
            r#"name = "streamed"
{sparse_then_q4}[[stage]]
kind = "quantize.rtn"
name = "w4"
input = "model"
format = "hf"
bits = 4
group = 32
[[stage]]
kind = "prune.channels"
name = "narrow"
input = "model"
fraction = 0.25
{extra}
[eval]
ctx = 64
chunks = 5
prompts = ["To be"]
max_new_tokens = 4
prefill_tokens = 16
decode_tokens = 4
stream = "{stream}"
"#,
            sparse_then_q4 = sparse_then_q4(&gguf, &text),
        );
        let file = dir.path().join(format!("{stream}-{}.toml", extra.len()));
        std::fs::write(&file, toml).unwrap();
        file
    };
    let run = |stream: &str| {
        let file = pipeline(stream, "");
        let out = dir.path().join(stream);
        ok(&["run", file.to_str().unwrap(), "-o", out.to_str().unwrap()]);
        let report: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
        (out, report)
    };
    let (whole_dir, whole) = run("never");
    let (streamed_dir, streamed) = run("always");
    assert_eq!(whole["eval"]["block_by_block"], false);
    assert_eq!(streamed["eval"]["block_by_block"], true);
    // Every model scores the same bits either way: perplexity, KL and top-1 against the input
    // model, and the sparsity, size and shape read from its blocks (a structured pruning's
    // narrower MLP among them).
    let rows = |r: &serde_json::Value| r["rows"].as_array().unwrap().clone();
    assert_eq!(rows(&whole).len(), 5);
    assert_ne!(rows(&whole)[4]["shape"], rows(&whole)[0]["shape"]);
    for (w, s) in rows(&whole).iter().zip(&rows(&streamed)) {
        for key in [
            "name",
            "perplexity",
            "kl_mean",
            "top1_agreement",
            "sparsity",
            "size_bytes",
            "bits_per_weight",
            "parameters",
            "shape",
        ] {
            assert_eq!(w[key], s[key], "{key} of {}", w["name"]);
        }
        assert!(w["perplexity"].as_f64().unwrap().is_finite());
        // Decode speed: a whole GGUF's blocks multiplied by shrink's integer products, and
        // through candle's quantized kernels (holding the file's tensors as stored) when read
        // block by block; nothing else is timed block by block.
        assert!(w["decode"].is_object(), "{w}");
        let backend = w["decode"]["backend"].as_str();
        match s["decode"]["backend"].as_str() {
            Some("candle-quantized") => assert!(
                matches!(backend, Some("shrink-integer" | "candle-f32")),
                "{w}"
            ),
            _ => assert!(s["decode"].is_null(), "{s}"),
        }
        if w["format"] == "gguf" && w["bits_per_weight"].as_f64().unwrap() < 16.0 {
            assert_eq!(backend, Some("shrink-integer"), "{w}");
        }
    }
    assert!(rows(&whole)[1]["kl_mean"].as_f64().unwrap() > 0.0);
    assert_eq!(rows(&whole)[1]["sparsity"], 0.5);
    // The same artifacts; the generations need the models whole and are left out.
    assert_eq!(artifacts(&whole_dir), artifacts(&streamed_dir));
    assert_eq!(whole["generations"].as_array().unwrap().len(), 1);
    assert!(streamed["generations"].as_array().unwrap().is_empty());
    let md = std::fs::read_to_string(streamed_dir.join("report.md")).unwrap();
    assert!(md.contains("block by block: no generations"), "{md}");

    // A stage that holds its model whole (layers ranked by the loss without each) cannot be
    // evaluated block by block: refused at once.
    let layers = pipeline(
        "always",
        "[[stage]]\nkind = \"prune.layers\"\nname = \"shallow\"\ninput = \"model\"\nfraction = 0.5\ncriterion = \"perplexity\"",
    );
    let out = dir.path().join("refused");
    let e = fails(&["run", layers.to_str().unwrap(), "-o", out.to_str().unwrap()]);
    assert!(
        e.contains("stream = \"always\"") && e.contains("stage `shallow`"),
        "{e}"
    );
    assert!(!out.join("stages").join("sparse").exists());
    let e = fails(&["validate", layers.to_str().unwrap()]);
    assert!(e.contains("stage `shallow`"), "{e}");
}

#[test]
fn prune_then_quantize_pipeline_keeps_the_sparsity_and_reports_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = tiny_gguf(dir.path());
    let toml = format!(
        r#"name = "sparse"
{sparse_then_q4}[[stage]]
kind = "prune.layers"
name = "shallow"
input = "model"
fraction = 0.5
[[stage]]
kind = "prune.width"
name = "narrow"
input = "model"
fraction = 0.25
importance = "magnitude"
format = "hf"
[eval]
ctx = 64
chunks = 4
prompts = ["To be"]
max_new_tokens = 4
prefill_tokens = 16
decode_tokens = 4
[sweep]
stage = "sparse"
key = "sparsity"
values = ["2:4", 0.25]
"#,
        sparse_then_q4 = sparse_then_q4(&gguf, &sample_text()),
    );
    let file = dir.path().join("sparse.toml");
    std::fs::write(&file, toml).unwrap();
    let run = dir.path().join("run");
    let summary: serde_json::Value = serde_json::from_str(&ok(&[
        "run",
        file.to_str().unwrap(),
        "-o",
        run.to_str().unwrap(),
        "--json",
    ]))
    .unwrap();
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("report.json")).unwrap()).unwrap();
    let models = report["rows"].as_array().unwrap();
    let by = |name: &str| models.iter().find(|m| m["name"] == name).unwrap().clone();
    assert_eq!(summary["passed"], true);
    assert_eq!(by("sparse")["sparsity"], 0.5);
    assert!((by("sparse@sparsity=0.25")["sparsity"].as_f64().unwrap() - 0.25).abs() < 1e-9);
    // GPTQ on the pruned model keeps its zeros: pruned and quantized in one chain.
    let q = by("sparse-q4");
    assert!(q["sparsity"].as_f64().unwrap() >= 0.5, "{q}");
    assert!(q["size_bytes"].as_u64() < by("sparse")["size_bytes"].as_u64());
    assert!(by("shallow")["parameters"].as_u64() < by("baseline")["parameters"].as_u64());
    assert_eq!(by("shallow")["shape"], "1 × 32, MLP 256, 4/2 heads");
    assert_eq!(by("narrow")["shape"], "2 × 24, MLP 256, 4/2 heads");
    assert!(by("narrow")["parameters"].as_u64() < by("baseline")["parameters"].as_u64());
    for m in models {
        assert!(m["perplexity"].as_f64().unwrap().is_finite(), "{m}");
    }
    // Per-layer sparsity of the pruned stages is in the report and its markdown.
    let layers = report["layers"].as_array().unwrap();
    let sparse = layers.iter().find(|l| l["stage"] == "sparse").unwrap();
    let rows = sparse["layers"].as_array().unwrap();
    assert_eq!(rows.len(), 14);
    assert!(rows
        .iter()
        .all(|l| l["sparsity"] == 0.5 && l["relative_output_error"].as_f64().unwrap() > 0.0));
    assert!(
        !layers.iter().any(|l| l["stage"] == "shallow"),
        "no empty per-layer table"
    );
    let q4 = layers.iter().find(|l| l["stage"] == "sparse-q4").unwrap();
    assert!(q4["layers"]
        .as_array()
        .unwrap()
        .iter()
        .all(|l| l["sparsity"].as_f64().unwrap() >= 0.5));
    let stage: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("stages/shallow/stage.json")).unwrap())
            .unwrap();
    assert_eq!(
        stage["pruning"]["structured"]["config"]["num_hidden_layers"],
        1
    );
    let md = std::fs::read_to_string(run.join("report.md")).unwrap();
    assert!(md.contains("sparse-q4") && md.contains("shallow"), "{md}");
    // A prune key on a quantization stage is refused with its position.
    let bad = std::fs::read_to_string(&file)
        .unwrap()
        .replace("format = \"q4_0\"", "format = \"q4_0\"\nsparsity = 0.5");
    std::fs::write(&file, bad).unwrap();
    let e = fails(&["validate", file.to_str().unwrap()]);
    assert!(
        e.contains("`sparsity` does not apply to a quantize.gptq stage"),
        "{e}"
    );
}

#[test]
fn distill_and_qat_train_and_write_loadable_models() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = tiny_gguf(dir.path());
    let model = gguf.to_str().unwrap();
    let text = sample_text();
    let text = text.to_str().unwrap();
    let common = [
        "--train",
        text,
        "--eval",
        text,
        "--steps",
        "6",
        "--batch",
        "2",
        "--seq-len",
        "32",
        "--lr",
        "2e-3",
        "--warmup",
        "1",
        "--eval-every",
        "3",
        "--eval-windows",
        "2",
    ];
    // A student made of the teacher's second block, its output matched to the teacher's.
    let student = dir.path().join("student.gguf");
    let mut args = vec![
        "distill", model, "--layers", "1", "--hidden", "auto", "--json",
    ];
    args.extend(common);
    args.extend(["-o", student.to_str().unwrap()]);
    let s: serde_json::Value = serde_json::from_str(&ok(&args)).unwrap();
    let out = &s["outcome"];
    assert!(out["parameters_student"].as_u64() < out["parameters_teacher"].as_u64());
    let eval = out["training"]["log"]["eval"].as_array().unwrap();
    let kl = |i: usize| eval[i][1][1][1].as_f64().unwrap();
    assert_eq!(eval.len(), 3);
    assert!(kl(2) < kl(0), "{eval:?}");
    let parts = &out["training"]["log"]["train"][0]["parts"];
    assert_eq!(parts[2][0], "hidden", "{parts}");
    let info: serde_json::Value =
        serde_json::from_str(&ok(&["inspect", student.to_str().unwrap(), "--json"])).unwrap();
    let names = info["tensors"].to_string();
    assert!(
        names.contains("blk.0.") && !names.contains("blk.1."),
        "{names}"
    );
    assert!(student
        .with_extension("gguf.distill")
        .join("log.json")
        .exists());
    eval_json(student.to_str().unwrap(), &[]);

    // QAT: GPTQ's Q4_0 codes, trained against the original, written as Q4_0 blocks.
    let qat = dir.path().join("qat.gguf");
    let mut args = vec![
        "distill",
        model,
        "--qat",
        "q4_0",
        "--calib",
        text,
        "--calib-samples",
        "4",
        "--json",
    ];
    args.extend(common.iter().map(|a| if *a == "2e-3" { "2e-4" } else { a }));
    args.extend(["-o", qat.to_str().unwrap()]);
    let q: serde_json::Value = serde_json::from_str(&ok(&args)).unwrap();
    assert!(q["quantization"]["method"]
        .as_str()
        .unwrap()
        .starts_with("QAT (6 steps) from Gptq"));
    assert_eq!(
        q["quantization"]["types"]["q4_0"], 14,
        "{}",
        q["quantization"]["types"]
    );
    // GPTQ's start is already close to this random teacher: six noisy steps must not wreck it
    // (the KL-lowering check is the unit test's, on a 2-bit start).
    let eval = q["training"]["log"]["eval"].as_array().unwrap();
    let kl = |i: usize| eval[i][1][1][1].as_f64().unwrap();
    assert!(kl(2).is_finite() && kl(2) < 1.5 * kl(0), "{eval:?}");
    assert!(q["size_bytes_after"].as_u64() < q["size_bytes_before"].as_u64());
    eval_json(qat.to_str().unwrap(), &[]);

    // Mistakes are named before any work.
    let out = dir.path().join("x.gguf");
    let out = out.to_str().unwrap();
    let e = fails(&["distill", model, "--train", text, "-o", out]);
    assert!(e.contains("no student"), "{e}");
    let e = fails(&[
        "distill", model, "--layers", "0,5", "--train", text, "-o", out,
    ]);
    assert!(e.contains("layer 5 does not exist"), "{e}");
    let e = fails(&["distill", model, "--layers", "0", "--loss", "js", "-o", out]);
    assert!(e.contains("unknown divergence 'js'"), "{e}");
    let e = fails(&[
        "distill",
        model,
        "--student-config",
        "depth=1",
        "--train",
        text,
        "-o",
        out,
    ]);
    assert!(e.contains("'depth'"), "{e}");
    let e = fails(&[
        "distill",
        model,
        "--layers",
        "0",
        "--hidden",
        "auto",
        "--attention",
        "0:9",
        "--train",
        text,
        "--eval",
        text,
        "-o",
        out,
    ]);
    assert!(e.contains("0:9"), "{e}");
    assert!(!Path::new(out).exists());
}

#[test]
fn distill_and_qat_stages_run_in_a_pipeline_with_loss_curves() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = tiny_gguf(dir.path());
    let text = sample_text();
    let text = text.to_str().unwrap();
    let toml = format!(
        r#"name = "train"
[model]
source = "{model}"
[data]
calib = "{text}"
eval = "{text}"
train = "{text}"
samples = 4
seq_len = 64
[[stage]]
kind = "prune.layers"
name = "shallow"
fraction = 0.5
[[stage]]
kind = "distill"
name = "recovered"
temperature = 2.0
alpha = 0.1
[stage.train]
steps = 5
batch = 2
seq_len = 32
lr = 2e-3
warmup = 1
eval_windows = 2
[[stage]]
kind = "quantize.qat"
name = "q4-qat"
input = "model"
format = "q4_0"
[stage.train]
steps = 3
batch = 2
seq_len = 32
eval_windows = 2
[eval]
ctx = 64
chunks = 4
prompts = ["To be"]
max_new_tokens = 4
prefill_tokens = 16
decode_tokens = 4
"#,
        model = gguf.display()
    );
    let file = dir.path().join("train.toml");
    std::fs::write(&file, &toml).unwrap();
    let run = dir.path().join("run");
    let args = [
        "run",
        file.to_str().unwrap(),
        "-o",
        run.to_str().unwrap(),
        "--json",
    ];
    ok(&args);
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("report.json")).unwrap()).unwrap();
    let curves = report["training"].as_array().unwrap();
    let names: Vec<&str> = curves
        .iter()
        .map(|c| c["stage"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["recovered", "q4-qat"]);
    assert_eq!(curves[0]["points"].as_array().unwrap().len(), 5);
    let rows = report["rows"].as_array().unwrap();
    let by = |name: &str| rows.iter().find(|m| m["name"] == name).unwrap().clone();
    assert_eq!(by("recovered")["shape"], by("shallow")["shape"]);
    assert!(by("recovered")["perplexity"].as_f64().unwrap().is_finite());
    assert!(by("q4-qat")["size_bytes"].as_u64() < by("baseline")["size_bytes"].as_u64());
    let html = std::fs::read_to_string(run.join("report.html")).unwrap();
    assert!(html.contains("Training loss"));
    assert!(
        !run.join("stages/recovered.train").exists(),
        "work folder removed"
    );
    // A rerun reuses both trained stages byte for byte.
    let before = artifacts(&run);
    let again = shrink(&args);
    assert!(String::from_utf8_lossy(&again.stderr).contains("recovered: done before, reused"));
    assert_eq!(before, artifacts(&run));
    // Training keys are checked with their position.
    let bad = toml.replace("temperature = 2.0", "temperature = -1.0");
    std::fs::write(&file, bad).unwrap();
    let e = fails(&["validate", file.to_str().unwrap()]);
    assert!(e.contains("temperature = -1 must be positive"), "{e}");
    let bad = toml.replace("name = \"q4-qat\"", "name = \"q4-qat\"\nlayers = \"0\"");
    std::fs::write(&file, bad).unwrap();
    let e = fails(&["validate", file.to_str().unwrap()]);
    assert!(
        e.contains("`layers` does not apply to a quantize.qat stage"),
        "{e}"
    );
}

/// The `[rows, cols]` of one tensor of a model file, from `shrink inspect --json`.
fn tensor_shape(model: &Path, name: &str) -> serde_json::Value {
    let info: serde_json::Value =
        serde_json::from_str(&ok(&["inspect", model.to_str().unwrap(), "--json"])).unwrap();
    info["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == name)
        .unwrap_or_else(|| panic!("no tensor {name} in {info}"))
        .clone()
}

/// GPT-2 from a Hugging Face folder: evaluates, converts to a GGUF that evaluates the same (the
/// GGUF's `attn_qkv` is the fused, transposed c_attn), quantizes with GPTQ to a Q8_0 GGUF whose
/// c_attn is q, k and v's blocks stacked, prunes, distils and generates; a quantized
/// compressed-tensors export and head pruning (which GPT-2's format cannot express) are refused
/// with the reason.
#[test]
fn gpt2_folder_evaluates_converts_quantizes_prunes_and_distils() {
    let dir = tempfile::tempdir().unwrap();
    let folder = common::tiny_gpt2_folder(dir.path(), 128);
    let f = folder.to_str().unwrap();
    let text = sample_text();
    let t = text.to_str().unwrap();
    let eval = |m: &Path| -> serde_json::Value {
        serde_json::from_str(&ok(&[
            "eval",
            m.to_str().unwrap(),
            "--text",
            t,
            "--ctx",
            "64",
            "--chunks",
            "4",
            "--protocol",
            "full",
            "--json",
        ]))
        .unwrap()
    };
    let ppl = |v: &serde_json::Value| v["perplexity"]["ppl"].as_f64().unwrap();
    let base = eval(&folder);
    assert!(ppl(&base) > 20.0 && ppl(&base) < 5000.0, "{}", ppl(&base));

    let gguf = dir.path().join("gpt2.gguf");
    ok(&["convert", f, "--to", "gguf", gguf.to_str().unwrap()]);
    let info: serde_json::Value =
        serde_json::from_str(&ok(&["inspect", gguf.to_str().unwrap(), "--json"])).unwrap();
    assert_eq!(info["architecture"], "gpt2");
    assert_eq!(
        tensor_shape(&gguf, "blk.1.attn_qkv.weight")["shape"],
        serde_json::json!([96, 32])
    );
    assert_eq!(
        tensor_shape(&gguf, "position_embd.weight")["shape"],
        serde_json::json!([128, 32])
    );
    assert!(
        !info.to_string().contains("\"output.weight\""),
        "the head is tied to token_embd"
    );
    let back = eval(&gguf);
    assert!(
        (ppl(&back) / ppl(&base) - 1.0).abs() < 1e-5,
        "{} vs {}",
        ppl(&back),
        ppl(&base)
    );

    let q8 = dir.path().join("q8.gguf");
    let out = ok(&[
        "quantize",
        f,
        "--method",
        "gptq",
        "--format",
        "gguf:q8_0",
        "--calib",
        t,
        "--samples",
        "8",
        "--seq-len",
        "32",
        "-o",
        q8.to_str().unwrap(),
    ]);
    assert!(out.contains("h.0.attn.c_attn.q"), "{out}");
    let q = eval(&q8);
    assert!(
        (ppl(&q) / ppl(&base) - 1.0).abs() < 0.02,
        "{} vs {}",
        ppl(&q),
        ppl(&base)
    );
    let qkv = tensor_shape(&q8, "blk.0.attn_qkv.weight");
    assert_eq!(qkv["dtype"], "Q8_0", "{qkv}");
    assert_eq!(qkv["shape"], serde_json::json!([96, 32]), "{qkv}");

    let hf_q = dir.path().join("hf-q");
    let refused = fails(&[
        "quantize",
        f,
        "--method",
        "rtn",
        "--format",
        "hf",
        "--bits",
        "8",
        "--group",
        "channel",
        "-o",
        hf_q.to_str().unwrap(),
    ]);
    assert!(
        refused.contains("c_attn") && refused.contains("GGUF"),
        "{refused}"
    );
    assert!(!hf_q.exists());

    let sparse = dir.path().join("wanda.gguf");
    ok(&[
        "prune",
        f,
        "--method",
        "wanda",
        "--sparsity",
        "0.5",
        "--calib",
        t,
        "--samples",
        "8",
        "--seq-len",
        "32",
        "-o",
        sparse.to_str().unwrap(),
    ]);
    assert!(ppl(&eval(&sparse)).is_finite());
    let refused = fails(&[
        "prune",
        f,
        "--method",
        "heads",
        "--fraction",
        "0.5",
        "--importance",
        "magnitude",
        "-o",
        dir.path().join("heads.gguf").to_str().unwrap(),
    ]);
    assert!(refused.contains("n_embd / n_head"), "{refused}");
    let channels = dir.path().join("channels.gguf");
    ok(&[
        "prune",
        f,
        "--method",
        "channels",
        "--fraction",
        "0.5",
        "--importance",
        "magnitude",
        "-o",
        channels.to_str().unwrap(),
    ]);
    assert_eq!(
        tensor_shape(&channels, "blk.0.ffn_up.weight")["shape"],
        serde_json::json!([64, 32])
    );
    assert!(ppl(&eval(&channels)).is_finite());

    let student = dir.path().join("student.gguf");
    ok(&[
        "distill",
        f,
        "--layers",
        "1",
        "--train",
        t,
        "--eval",
        t,
        "--steps",
        "2",
        "--batch",
        "2",
        "--seq-len",
        "32",
        "--eval-windows",
        "2",
        "-o",
        student.to_str().unwrap(),
    ]);
    assert!(ppl(&eval(&student)).is_finite());
    let generated = ok(&[
        "generate",
        gguf.to_str().unwrap(),
        "--prompt",
        "the",
        "--max-tokens",
        "5",
    ]);
    assert!(!generated.is_empty());
}

/// A pipeline of `search` stages on `model`; `stages` is their TOML.
fn search_pipeline(dir: &Path, model: &Path, stages: &str) -> PathBuf {
    let text = sample_text();
    let toml = format!(
        r#"name = "search"
seed = 1
[model]
source = "{model}"
[data]
calib = "{text}"
eval = "{text}"
samples = 8
seq_len = 64
{stages}
[eval]
ctx = 64
chunks = 4
prompts = []
decode_tokens = 0
"#,
        model = model.display(),
        text = text.display()
    );
    let path = dir.join(format!("search-{}.toml", toml.len()));
    std::fs::write(&path, toml).unwrap();
    path
}

/// `shrink run FILE -o RUN` with its own cache folder; it must succeed.
fn run_with_cache(file: &Path, run: &Path, cache: &Path) {
    let out = Command::new(env!("CARGO_BIN_EXE_shrink"))
        .args(["run", file.to_str().unwrap(), "-o", run.to_str().unwrap()])
        .env("SHRINK_CACHE_DIR", cache)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
}

/// The search stage: a bits-per-weight budget is met with the file size predicted to the byte; a
/// perplexity budget is met as measured; an impossible size still writes the smallest mix and
/// says so; the sensitivity table is measured once and reused; the report shows every round and
/// the sensitivity chart. GPT-2's fused q/k/v get one type.
#[test]
fn search_stage_meets_budgets_reuses_sensitivity_and_writes_a_best_effort() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = tiny_gguf(dir.path());
    let formats = r#"formats = ["q8_0", "q6_k", "q4_k", "q4_0"]
embedding_formats = ["q8_0", "q4_0"]"#;
    let stages = format!(
        r#"[[stage]]
kind = "search"
name = "bpw"
input = "model"
{formats}
[stage.budget]
target_bpw = 6.0
[[stage]]
kind = "search"
name = "ppl"
input = "model"
{formats}
[stage.budget]
max_ppl_increase_pct = 2.0
rounds = 4
[[stage]]
kind = "search"
name = "tight"
input = "model"
{formats}
[stage.budget]
max_size_mb = 0.001
"#
    );
    let file = search_pipeline(dir.path(), &gguf, &stages);
    let run = dir.path().join("run");
    let cache = dir.path().join("cache");
    run_with_cache(&file, &run, &cache);
    let record = |name: &str| -> serde_json::Value {
        let text = std::fs::read_to_string(run.join("stages").join(name).join("stage.json"));
        serde_json::from_str(&text.unwrap()).unwrap()
    };
    let file_size = |name: &str| {
        std::fs::metadata(run.join("stages").join(name).join("model.gguf"))
            .unwrap()
            .len()
    };
    // The size of a mix as the sensitivity table predicts it: fixed bytes plus each option's.
    let predicted = |s: &serde_json::Value, choices: &[serde_json::Value]| -> u64 {
        let items = s["sensitivity"].as_array().unwrap();
        let bytes: u64 = items
            .iter()
            .zip(choices)
            .map(|(it, c)| {
                let opts = it["choices"].as_array().unwrap();
                let o = opts.iter().find(|o| o["name"] == *c).unwrap();
                o["size_bytes"].as_u64().unwrap()
            })
            .sum();
        s["fixed_bytes"].as_u64().unwrap() + bytes
    };

    let bpw = record("bpw")["search"].clone();
    let o = &bpw["outcome"];
    let best = &o["tried"][o["best"].as_u64().unwrap() as usize];
    let goal = o["goal"]["max_size"].as_u64().unwrap();
    let weights = bpw["searched_weights"].as_u64().unwrap();
    assert_eq!(
        goal,
        bpw["fixed_bytes"].as_u64().unwrap() + (6.0 * weights as f64 / 8.0) as u64
    );
    assert_eq!(o["met"], true);
    assert_eq!(bpw["sensitivity_cached"], false);
    assert_eq!(file_size("bpw"), best["size_bytes"].as_u64().unwrap());
    assert_eq!(
        file_size("bpw"),
        predicted(&bpw, best["choices"].as_array().unwrap())
    );
    assert!(file_size("bpw") <= goal);
    let names: Vec<&str> = best["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    // A mix, not one format: 6 bits on average between 8.5 and 4.5.
    assert!(
        names.contains(&"q8_0") && names.iter().any(|n| *n != "q8_0"),
        "{names:?}"
    );

    let ppl = record("ppl")["search"].clone();
    assert_eq!(ppl["sensitivity_cached"], true);
    let o = &ppl["outcome"];
    let best = &o["tried"][o["best"].as_u64().unwrap() as usize];
    assert_eq!(o["met"], true);
    assert!(best["score"]["ppl_increase_pct"].as_f64().unwrap() <= 2.0);
    assert_eq!(file_size("ppl"), best["size_bytes"].as_u64().unwrap());

    // Nothing fits 1 kB: the smallest option of every tensor is written, flagged as a miss.
    let tight = record("tight")["search"].clone();
    assert_eq!(tight["sensitivity_cached"], true);
    let o = &tight["outcome"];
    assert_eq!(o["met"], false);
    let smallest: Vec<serde_json::Value> = tight["sensitivity"]
        .as_array()
        .unwrap()
        .iter()
        .map(|it| {
            let opts = it["choices"].as_array().unwrap();
            let o = opts
                .iter()
                .min_by_key(|o| o["size_bytes"].as_u64().unwrap())
                .unwrap();
            o["name"].clone()
        })
        .collect();
    assert_eq!(file_size("tight"), predicted(&tight, &smallest));

    let md = std::fs::read_to_string(run.join("report.md")).unwrap();
    assert!(
        md.contains("## Search: tight") && md.contains("NOT met"),
        "{md}"
    );
    assert!(
        md.contains("## Search: bpw") && md.contains("written"),
        "{md}"
    );
    let html = std::fs::read_to_string(run.join("report.html")).unwrap();
    assert!(html.contains("Sensitivity — bpw: KL with only this tensor in q4_0"));

    // GPT-2 stores q, k and v as one GGUF tensor: the search gives them one type.
    let folder = common::tiny_gpt2_folder(dir.path(), 128);
    let gpt2 = search_pipeline(
        dir.path(),
        &folder,
        r#"[[stage]]
kind = "search"
name = "gpt2"
formats = ["q8_0", "q4_0"]
[stage.budget]
target_bpw = 6.5
"#,
    );
    let run2 = dir.path().join("run-gpt2");
    run_with_cache(&gpt2, &run2, &cache);
    let text = std::fs::read_to_string(run2.join("stages/gpt2/stage.json")).unwrap();
    let rec: serde_json::Value = serde_json::from_str(&text).unwrap();
    let items = rec["search"]["sensitivity"].as_array().unwrap();
    assert!(items.iter().any(|it| it["name"]
        .as_str()
        .unwrap()
        .ends_with("c_attn.q+h.0.attn.c_attn.k+h.0.attn.c_attn.v")
        || it["name"].as_str().unwrap().contains("c_attn.q+")));
    assert_eq!(rec["search"]["outcome"]["met"], true);
}

/// SignRound's settings go with SignRound only, and GPTQ's settings are refused with it rather
/// than ignored; it does not run as the start of QAT.
#[test]
fn signround_settings_are_refused_where_they_would_do_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = tiny_gguf(dir.path());
    let g = gguf.to_str().unwrap();
    let out = dir.path().join("x.gguf");
    let o = out.to_str().unwrap();
    let e = fails(&[
        "quantize",
        g,
        "--format",
        "gguf:q4_0",
        "--steps",
        "5",
        "-o",
        o,
    ]);
    assert!(
        e.contains("--steps and --lr are SignRound's settings"),
        "{e}"
    );
    for extra in [&["--blend", "0.5"][..], &["--no-act-order"], &["--imatrix"]] {
        let mut args = vec![
            "quantize",
            g,
            "--format",
            "gguf:q4_0",
            "--method",
            "signround",
        ];
        args.extend_from_slice(extra);
        args.extend(["-o", o]);
        let e = fails(&args);
        assert!(e.contains("SignRound fixes its grids"), "{extra:?}: {e}");
    }
    let e = fails(&[
        "distill",
        g,
        "--qat",
        "q4_0",
        "--qat-init",
        "signround",
        "-o",
        o,
    ]);
    assert!(e.contains("expected gptq or rtn"), "{e}");
    assert!(!out.exists());
}

/// Qwen3 and Gemma 3 (Hugging Face folders generated here) through every technique: GGUF
/// conversion, RTN/GPTQ/AWQ/AWQ-GPTQ/SignRound to Q8_0 (AWQ folds its scales into Gemma's
/// `1 + w` norms), the Q4_K_M preset, SmoothQuant W8A8 and W4 compressed-tensors folders,
/// unstructured and 2:4 pruning, heads, channels, layers and width (Gemma's norms rescaled as
/// `1 + w`, QK-norms kept whole), a layer-subset student, QAT and a search stage. Quantized files
/// stay close to the float model; every output loads and scores.
#[test]
fn qwen3_and_gemma3_run_every_technique() {
    let dir = tempfile::tempdir().unwrap();
    let text = sample_text();
    let t = text.to_str().unwrap();
    let eval = |m: &Path| -> f64 {
        let v: serde_json::Value = serde_json::from_str(&ok(&[
            "eval",
            m.to_str().unwrap(),
            "--text",
            t,
            "--ctx",
            "128",
            "--chunks",
            "3",
            "--protocol",
            "full",
            "--json",
        ]))
        .unwrap();
        v["perplexity"]["ppl"].as_f64().unwrap()
    };
    let calib = ["--calib", t, "--samples", "8", "--seq-len", "64"];
    for family in ["qwen3", "gemma3"] {
        let folder = common::tiny_family_folder(dir.path(), family);
        let f = folder.to_str().unwrap();
        let out = |name: &str| dir.path().join(format!("{family}-{name}"));
        let base = eval(&folder);
        assert!(base.is_finite() && base > 1.0, "{family}: {base}");

        let gguf = out("f32.gguf");
        ok(&["convert", f, "--to", "gguf", gguf.to_str().unwrap()]);
        let back = eval(&gguf);
        assert!(
            (back / base - 1.0).abs() < 1e-5,
            "{family}: {back} vs {base}"
        );

        for method in ["rtn", "gptq", "awq", "awq-gptq", "signround"] {
            let q8 = out(&format!("{method}-q8_0.gguf"));
            let mut args = vec!["quantize", f, "--method", method, "--format", "gguf:q8_0"];
            args.extend(calib);
            args.extend(["-o", q8.to_str().unwrap()]);
            ok(&args);
            let q = eval(&q8);
            eprintln!("{family} {method} q8_0: {q:.4} (float {base:.4})");
            assert!(
                (q / base - 1.0).abs() < 0.02,
                "{family} {method}: {q} vs {base}"
            );
        }
        let mut outputs = vec![];
        let quantize: [&[&str]; 3] = [
            &["--preset", "q4_k_m", "--method", "gptq"],
            &["--preset", "w8a8"],
            &[
                "--format", "hf", "--bits", "4", "--group", "32", "--method", "gptq",
            ],
        ];
        for (i, extra) in quantize.iter().enumerate() {
            let o = out(&format!("quant-{i}"));
            let mut args = vec!["quantize", f];
            args.extend(*extra);
            args.extend(calib);
            args.extend(["-o", o.to_str().unwrap()]);
            ok(&args);
            outputs.push(o);
        }
        let prune: [&[&str]; 7] = [
            &["--method", "magnitude", "--sparsity", "0.5"],
            &["--method", "wanda", "--sparsity", "0.5"],
            &["--method", "sparsegpt", "--sparsity", "2:4"],
            &["--method", "heads", "--fraction", "0.5"],
            &["--method", "channels", "--fraction", "0.25"],
            &["--method", "layers", "--fraction", "0.34"],
            &["--method", "width", "--fraction", "0.25"],
        ];
        for (i, extra) in prune.iter().enumerate() {
            let o = out(&format!("prune-{i}.gguf"));
            let mut args = vec!["prune", f];
            args.extend(*extra);
            args.extend(calib);
            args.extend(["-o", o.to_str().unwrap()]);
            ok(&args);
            outputs.push(o);
        }
        let width = out("prune-6.gguf");
        let q_norm = tensor_shape(&width, "blk.0.attn_q_norm.weight");
        assert_eq!(q_norm["shape"], serde_json::json!([16]), "{q_norm}");
        assert_eq!(
            tensor_shape(&width, "blk.0.attn_norm.weight")["shape"],
            serde_json::json!([24])
        );
        let layers = if family == "gemma3" { "0,5" } else { "1" };
        let student = out("student.gguf");
        let train = [
            "--train",
            t,
            "--eval",
            t,
            "--steps",
            "2",
            "--batch",
            "2",
            "--seq-len",
            "32",
            "--eval-windows",
            "2",
        ];
        let mut args = vec!["distill", f, "--layers", layers];
        args.extend(train);
        args.extend(["-o", student.to_str().unwrap()]);
        ok(&args);
        // The student keeps each kept layer's attention: Gemma's layer 5 is its global one.
        let config = shrink_io::load(&student).unwrap().config;
        let kinds = shrink_models::ModelConfig::from_json(&config).unwrap();
        let sliding: Vec<bool> = (0..kinds.num_hidden_layers)
            .map(|i| kinds.is_sliding_layer(i))
            .collect();
        let want = if family == "gemma3" {
            vec![true, false]
        } else {
            vec![false]
        };
        assert_eq!(sliding, want, "{family} student");
        outputs.push(student);
        let layers_pruned = out("prune-5.gguf");
        let config = shrink_io::load(&layers_pruned).unwrap().config;
        let pruned = shrink_models::ModelConfig::from_json(&config).unwrap();
        assert_eq!(
            pruned.num_hidden_layers,
            if family == "gemma3" { 4 } else { 1 }
        );
        let qat = out("qat.gguf");
        let mut args = vec![
            "distill",
            f,
            "--qat",
            "q8_0",
            "--calib",
            t,
            "--calib-samples",
            "4",
            "--lr",
            "2e-4",
        ];
        args.extend(train);
        args.extend(["-o", qat.to_str().unwrap()]);
        ok(&args);
        let q = eval(&qat);
        assert!((q / base - 1.0).abs() < 0.05, "{family} QAT: {q} vs {base}");
        for o in &outputs {
            let p = eval(o);
            eprintln!("{family} {}: {p:.4}", o.display());
            assert!(p.is_finite() && p > 1.0, "{family} {}: {p}", o.display());
        }
        let stages = r#"[[stage]]
kind = "search"
name = "bpw"
input = "model"
formats = ["q8_0", "q4_0"]
embedding_formats = ["q8_0"]
[stage.budget]
target_bpw = 6.0
"#;
        let file = search_pipeline(dir.path(), &folder, stages);
        let run = out("run");
        run_with_cache(&file, &run, &out("cache"));
        let searched = run.join("stages").join("bpw").join("model.gguf");
        let p = eval(&searched);
        assert!(
            (p / base - 1.0).abs() < 0.05,
            "{family} search: {p} vs {base}"
        );
    }
}

/// A request file of `docs` PIQA-format documents (OLMES layout, gzipped): two solutions each,
/// one line per choice plus an unconditioned line to skip.
fn piqa_requests(dir: &Path, docs: usize) -> PathBuf {
    use std::io::Write;
    let path = dir.join("piqa.jsonl.gz");
    let mut gz = flate2::write::GzEncoder::new(
        std::fs::File::create(&path).unwrap(),
        flate2::Compression::default(),
    );
    let words = [
        "the tempest",
        "a storm",
        "the king",
        "be or not",
        "a ship",
        "the isle",
    ];
    for d in 0..docs {
        let doc = serde_json::json!({
            "goal": format!("How is {}?", words[d % 6]),
            "sol1": format!("It is {}.", words[(d + 1) % 6]),
            "sol2": format!("Not {} at all", words[(d + 2) % 6]),
            "label": d % 2,
        });
        for doc_id in [d, d, 1_000_000 + d] {
            writeln!(gz, "{}", serde_json::json!({"doc_id": doc_id, "doc": doc})).unwrap();
        }
    }
    gz.finish().unwrap();
    path
}

/// `shrink eval --task` and `[eval] tasks`: zero-shot accuracy beside the perplexity, in the
/// JSON, the report's tasks table and the task gates; a bad task is refused with its name.
#[test]
fn tasks_are_scored_by_eval_and_pipelines_and_gated() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = tiny_gguf(dir.path());
    let requests = piqa_requests(dir.path(), 12);
    let spec = format!("piqa={}", requests.display());
    let text = sample_text();
    let out: serde_json::Value = serde_json::from_str(&ok(&[
        "eval",
        gguf.to_str().unwrap(),
        "--text",
        text.to_str().unwrap(),
        "--ctx",
        "64",
        "--chunks",
        "2",
        "--task",
        &spec,
        "--task",
        &format!("{spec}:5"),
        "--json",
    ]))
    .unwrap();
    let tasks = out["tasks"].as_array().unwrap();
    assert_eq!(tasks.len(), 2);
    assert_eq!(tasks[0]["task"], "piqa");
    assert_eq!(tasks[0]["docs"], 12);
    assert_eq!(tasks[1]["docs"], 5);
    let acc = tasks[0]["acc_norm"].as_f64().unwrap();
    assert!(
        (0.0..=1.0).contains(&acc) && (acc * 12.0).fract() < 1e-9,
        "{acc}"
    );
    let t = text.to_str().unwrap();
    let e = fails(&[
        "eval",
        gguf.to_str().unwrap(),
        "--text",
        t,
        "--task",
        "trivia",
    ]);
    assert!(e.contains("unknown task 'trivia'"), "{e}");

    let toml = format!(
        r#"name = "tasks"
seed = 1
[model]
source = "{model}"
[data]
calib = "{text}"
eval = "{text}"
samples = 4
seq_len = 32
[[stage]]
kind = "quantize.rtn"
name = "q8"
format = "gguf:q8_0"
[eval]
ctx = 64
chunks = 2
prompts = []
decode_tokens = 0
tasks = ["{spec}"]
[gates]
min_acc_norm = 0.0
max_acc_norm_drop = 100.0
"#,
        model = gguf.display(),
        text = text.display(),
    );
    let file = dir.path().join("tasks.toml");
    std::fs::write(&file, toml).unwrap();
    let run = dir.path().join("run");
    ok(&["run", file.to_str().unwrap(), "-o", run.to_str().unwrap()]);
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("report.json")).unwrap()).unwrap();
    let rows = report["rows"].as_array().unwrap();
    assert_eq!(rows[0]["tasks"][0]["docs"], 12, "the baseline is scored");
    assert!(rows[1]["acc_norm_drop"].is_number(), "{}", rows[1]);
    let gates = report["gates"].as_array().unwrap();
    assert!(gates
        .iter()
        .any(|g| g["gate"] == "max_acc_norm_drop" && g["passed"] == true));
    let md = std::fs::read_to_string(run.join("report.md")).unwrap();
    assert!(
        md.contains("## Tasks (zero-shot)") && md.contains("| piqa |"),
        "{md}"
    );
}
