//! Round trips through GGUF and Hugging Face folders on a tiny generated model, and every kind of
//! bad input named in the error.

use super::*;
use candle_core::{DType, Device, Tensor};
use shrink_models::{ModelConfig, Transformer};
use std::collections::BTreeMap;

fn tiny_vocab() -> GgufVocab {
    GgufVocab::byte_level(
        &["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        &["Ġ t", "h e", "Ġt he"],
        Some("smollm"),
    )
}

fn tiny_config() -> ModelConfig {
    let mut cfg = ModelConfig::tiny_for_tests();
    cfg.vocab_size = tiny_vocab().tokens.len();
    cfg.tie_word_embeddings = true;
    cfg
}

fn tiny_checkpoint() -> (Transformer, Checkpoint) {
    let cfg = tiny_config();
    let model = Transformer::random(&cfg, 11, &Device::Cpu).unwrap();
    let tokenizer = TokenizerBundle::from_gguf_vocab(
        Path::new("test"),
        tiny_vocab(),
        Some(1),
        Some(2),
        false,
        Some("{{ messages[0]['content'] }}".into()),
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
    (model, checkpoint)
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn logits(c: &Checkpoint) -> Tensor {
    let cfg = ModelConfig::from_json(&c.config).unwrap();
    let model = Transformer::from_tensors(&cfg, c.tensors.load_all().unwrap(), DType::F32).unwrap();
    let ids = Tensor::new(&[[5u32, 80, 200, 259, 260, 7, 3]], &Device::Cpu).unwrap();
    model.forward(&ids).unwrap()
}

#[test]
fn tokenizer_from_gguf_vocab_applies_merges_digits_and_specials() {
    let (_, c) = tiny_checkpoint();
    let tok = c.tokenizer().unwrap();
    let the = tok.tokenizer.token_to_id("Ġthe").unwrap();
    let ids = tok.encode("the the 12", false).unwrap();
    // "the" has no leading space, so it is t + he; " the" is one token; digits split one by one.
    let t = tok.tokenizer.token_to_id("t").unwrap();
    let he = tok.tokenizer.token_to_id("he").unwrap();
    let space = tok.tokenizer.token_to_id("Ġ").unwrap();
    let one = tok.tokenizer.token_to_id("1").unwrap();
    let two = tok.tokenizer.token_to_id("2").unwrap();
    assert_eq!(ids, vec![t, he, the, space, one, two]);
    assert_eq!(tok.decode(&ids, false).unwrap(), "the the 12");
    // Special tokens are parsed only when asked for.
    assert_eq!(tok.encode("<|im_start|>", true).unwrap(), vec![1]);
    assert!(tok.encode("<|im_start|>", false).unwrap().len() > 1);
}

#[test]
fn gguf_f32_round_trip_is_exact_and_hf_round_trip_keeps_logits() {
    let (_, c) = tiny_checkpoint();
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("tiny.gguf");
    write_llama_gguf(&c, &gguf, GgufWriteType::F32, &Default::default()).unwrap();
    let loaded = load(&gguf).unwrap();
    assert_eq!(loaded.format, Format::Gguf);
    assert_eq!(loaded.tensors.len(), c.tensors.len());
    for (name, t) in &c.tensors.load_all().unwrap() {
        assert_eq!(
            max_diff(t, &loaded.tensors.get(name).unwrap()),
            0.0,
            "{name}"
        );
    }
    let cfg = ModelConfig::from_json(&loaded.config).unwrap();
    assert_eq!(cfg.num_kv_heads(), 2);
    assert!(cfg.tie_word_embeddings);
    let text = "the theatre, 1601";
    assert_eq!(
        loaded.tokenizer().unwrap().encode(text, false).unwrap(),
        c.tokenizer().unwrap().encode(text, false).unwrap()
    );

    // GGUF -> HF folder -> load: same logits, same tokens.
    let hf = dir.path().join("hf");
    save_hf(&loaded, &hf, SaveDType::F32).unwrap();
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        assert!(hf.join(f).is_file(), "{f}");
    }
    let back = load(&hf).unwrap();
    assert!(max_diff(&logits(&loaded), &logits(&back)) <= 1e-4);
    assert_eq!(
        back.tokenizer().unwrap().encode(text, false).unwrap(),
        c.tokenizer().unwrap().encode(text, false).unwrap()
    );
    assert_eq!(
        back.tokenizer().unwrap().chat_template,
        c.tokenizer().unwrap().chat_template
    );
    assert_eq!(back.tokenizer().unwrap().eos_token_ids, vec![2]);

    // Saving again is byte-identical (deterministic artifacts).
    let hf2 = dir.path().join("hf2");
    save_hf(&loaded, &hf2, SaveDType::F32).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert_eq!(
            std::fs::read(hf.join(f)).unwrap(),
            std::fs::read(hf2.join(f)).unwrap(),
            "{f}"
        );
    }
}

#[test]
fn q8_gguf_is_close_and_inspect_reports_bits_per_weight() {
    let (_, c) = tiny_checkpoint();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q8.gguf");
    write_llama_gguf(&c, &path, GgufWriteType::Q8_0, &Default::default()).unwrap();
    let loaded = load(&path).unwrap();
    let name = "model.layers.0.self_attn.q_proj.weight";
    let (orig, q) = (
        &c.tensors.get(name).unwrap(),
        &loaded.tensors.get(name).unwrap(),
    );
    let scale = orig
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let diff = max_diff(orig, q);
    assert!(
        diff > 0.0 && diff <= scale / 127.0,
        "Q8_0 error {diff} vs step {}",
        scale / 127.0
    );
    let info = inspect(&path).unwrap();
    assert_eq!(info.architecture, "llama");
    assert_eq!(
        info.parameters as usize,
        c.tensors
            .names()
            .map(|n| c.tensors.shape(n).unwrap().iter().product::<usize>())
            .sum::<usize>()
    );
    let t = info
        .tensors
        .iter()
        .find(|t| t.name == "blk.0.attn_q.weight")
        .unwrap();
    assert_eq!(t.dtype, "Q8_0");
    assert_eq!(t.shape, vec![32, 32]);
    assert_eq!(t.bits_per_weight, 8.5);
    let norm = info
        .tensors
        .iter()
        .find(|t| t.name == "blk.0.attn_norm.weight")
        .unwrap();
    assert_eq!((norm.dtype.as_str(), norm.bits_per_weight), ("F32", 32.0));
    assert_eq!(
        info.file_size_bytes,
        std::fs::metadata(&path).unwrap().len()
    );
    let hf = dir.path().join("hf");
    save_hf(&loaded, &hf, SaveDType::BF16).unwrap();
    let info = inspect(&hf).unwrap();
    assert_eq!(info.architecture, "LlamaForCausalLM");
    assert_eq!(info.bits_per_weight, 16.0);
}

#[test]
fn sharded_folders_load_through_the_index() {
    let (_, c) = tiny_checkpoint();
    let dir = tempfile::tempdir().unwrap();
    save_hf(&c, dir.path(), SaveDType::F32).unwrap();
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    let all = c.tensors.load_all().unwrap();
    let names: Vec<&String> = all.keys().collect();
    let (a, b) = names.split_at(names.len() / 2);
    let mut map = serde_json::Map::new();
    for (file, part) in [
        ("model-00001-of-00002.safetensors", a),
        ("model-00002-of-00002.safetensors", b),
    ] {
        let tensors: Vec<(&str, &Tensor)> = part.iter().map(|n| (n.as_str(), &all[*n])).collect();
        safetensors::serialize_to_file(tensors, None, &dir.path().join(file)).unwrap();
        for n in part.iter() {
            map.insert(n.to_string(), file.into());
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    let loaded = load(dir.path()).unwrap();
    assert_eq!(loaded.tensors.len(), c.tensors.len());
    assert!(max_diff(&logits(&c), &logits(&loaded)) == 0.0);
}

fn err_of<T: std::fmt::Debug>(r: Result<T>) -> String {
    r.unwrap_err().to_string()
}

#[test]
fn bad_files_are_named_in_errors() {
    let (_, c) = tiny_checkpoint();
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("m.gguf");
    write_llama_gguf(&c, &gguf, GgufWriteType::F32, &Default::default()).unwrap();
    let bytes = std::fs::read(&gguf).unwrap();

    // Missing file.
    let missing = dir.path().join("nope.gguf");
    assert!(err_of(load(&missing)).contains("nope.gguf: no such file"));

    // Truncated data section: the error names the file and a tensor.
    let cut = dir.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() - 1000]).unwrap();
    let e = err_of(load(&cut));
    assert!(
        e.contains("cut.gguf") && e.contains("tensor '") && e.contains("truncated"),
        "{e}"
    );

    // Truncated header.
    std::fs::write(&cut, &bytes[..100]).unwrap();
    let e = err_of(load(&cut));
    assert!(
        e.contains("cut.gguf") && e.contains("corrupt or truncated GGUF header"),
        "{e}"
    );

    // Not a model file at all.
    let junk = dir.path().join("junk.bin");
    std::fs::write(&junk, b"hello world, not a model").unwrap();
    assert!(err_of(load(&junk)).contains("not a GGUF file"));

    // Unknown architecture.
    let arch = dir.path().join("arch.gguf");
    let patched = replace_once(&bytes, b"llama", b"mamba");
    std::fs::write(&arch, patched).unwrap();
    let e = err_of(load(&arch));
    assert!(
        e.contains("arch.gguf") && e.contains("unsupported architecture 'mamba'"),
        "{e}"
    );

    // Unknown pre-tokenizer names its metadata key.
    let pre = dir.path().join("pre.gguf");
    std::fs::write(&pre, replace_once(&bytes, b"smollm", b"zzzzzz")).unwrap();
    let e = err_of(load(&pre));
    assert!(
        e.contains("pre.gguf") && e.contains("tokenizer.ggml.pre") && e.contains("zzzzzz"),
        "{e}"
    );

    // HF folder problems.
    let hf = dir.path().join("hf");
    save_hf(&c, &hf, SaveDType::F32).unwrap();
    let st = hf.join("model.safetensors");
    let full = std::fs::read(&st).unwrap();
    std::fs::write(&st, &full[..full.len() / 2]).unwrap();
    let e = err_of(load(&hf));
    assert!(
        e.contains("model.safetensors") && e.contains("corrupt or truncated safetensors"),
        "{e}"
    );
    std::fs::write(&st, &full).unwrap();

    std::fs::write(hf.join("tokenizer.json"), "{\"model\": 5}").unwrap();
    let e = err_of(load(&hf));
    assert!(
        e.contains("tokenizer.json") && e.contains("tokenizer"),
        "{e}"
    );
    std::fs::remove_file(hf.join("tokenizer.json")).unwrap();
    let no_tok = load(&hf).unwrap();
    assert!(err_of(no_tok.tokenizer()).contains("no tokenizer"));

    std::fs::write(hf.join("config.json"), "{not json").unwrap();
    let e = err_of(load(&hf));
    assert!(
        e.contains("config.json") && e.contains("invalid JSON"),
        "{e}"
    );
    std::fs::remove_file(hf.join("config.json")).unwrap();
    assert!(err_of(load(&hf)).contains("config.json: no such file"));
}

fn replace_once(haystack: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let pos = haystack
        .windows(from.len())
        .position(|w| w == from)
        .unwrap();
    let mut out = haystack.to_vec();
    out[pos..pos + to.len()].copy_from_slice(to);
    out
}

#[test]
fn prequantized_blocks_are_written_verbatim_with_qk_rows_permuted() {
    use candle_core::quantized::{GgmlDType, QTensor};
    let (_, c) = tiny_checkpoint();
    let mut pre = BTreeMap::new();
    for name in [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.1.mlp.up_proj.weight",
    ] {
        let q = QTensor::quantize(&c.tensors.get(name).unwrap(), GgmlDType::Q4_0).unwrap();
        pre.insert(
            name.to_string(),
            QuantizedBlocks {
                dtype: crate::ggml::GgmlType::Q4_0,
                bytes: q.data().unwrap().to_vec(),
            },
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pre.gguf");
    write_llama_gguf(&c, &path, GgufWriteType::F32, &pre).unwrap();
    // The planned size is the written file's, to the byte.
    let types = pre.iter().map(|(n, q)| (n.clone(), q.dtype)).collect();
    let planned = crate::LlamaGguf::plan(&c, &path, GgufWriteType::F32, &types)
        .unwrap()
        .file_size()
        .unwrap();
    assert_eq!(planned, std::fs::metadata(&path).unwrap().len());
    let info = inspect(&path).unwrap();
    let ty = |n: &str| {
        info.tensors
            .iter()
            .find(|t| t.name == n)
            .unwrap()
            .dtype
            .clone()
    };
    assert_eq!(
        (
            ty("blk.0.attn_q.weight"),
            ty("blk.1.ffn_up.weight"),
            ty("blk.1.ffn_down.weight")
        ),
        ("Q4_0".into(), "Q4_0".into(), "F32".into())
    );
    // Loading undoes the row permutation: the dequantized blocks come back in HF row order.
    let loaded = load(&path).unwrap();
    for name in pre.keys() {
        let want = QTensor::quantize(&c.tensors.get(name).unwrap(), GgmlDType::Q4_0)
            .unwrap()
            .dequantize(&Device::Cpu)
            .unwrap();
        assert_eq!(
            max_diff(&loaded.tensors.get(name).unwrap(), &want),
            0.0,
            "{name}"
        );
        // The packed blocks come back in HF row order too: they dequantize to the same tensor,
        // and are the written blocks, rows moved whole.
        let packed = loaded.tensors.packed(name).unwrap().unwrap();
        let values = Tensor::from_vec(packed.dequantize(), want.dims(), &Device::Cpu).unwrap();
        assert_eq!(max_diff(&values, &want), 0.0, "{name}");
        let mut sorted = packed.data().to_vec();
        let mut written = pre[name].bytes.clone();
        sorted.sort_unstable();
        written.sort_unstable();
        assert_eq!(sorted, written, "{name}");
    }
    // Float tensors have no blocks to multiply by.
    let float = "model.layers.1.mlp.down_proj.weight";
    assert!(loaded.tensors.packed(float).unwrap().is_none());
    let mut bad = pre.clone();
    bad.get_mut("model.layers.1.mlp.up_proj.weight")
        .unwrap()
        .bytes
        .pop();
    let e = write_llama_gguf(&c, &path, GgufWriteType::F32, &bad)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("model.layers.1.mlp.up_proj.weight") && e.contains("do not fit"),
        "{e}"
    );
}

/// A SentencePiece-style `tokenizer.json` (byte-fallback BPE, Llama 2's layout): `<unk> <s> </s>`,
/// the 256 byte tokens, a few characters and the pieces `merges` make.
fn spm_tokenizer_json(layout: &str) -> String {
    let merges = [
        "▁ t", "h e", "▁t he", "▁ a", "a t", "▁t h", "e r", "▁th e", "▁a t",
    ];
    let mut vocab: Vec<String> = ["<unk>", "<s>", "</s>"].map(String::from).to_vec();
    vocab.extend((0..=255).map(|b| format!("<0x{b:02X}>")));
    vocab.extend("▁thearnd".chars().map(String::from));
    for m in merges {
        let piece = m.replace(' ', "");
        if !vocab.contains(&piece) {
            vocab.push(piece);
        }
    }
    let vocab: serde_json::Map<String, serde_json::Value> = vocab
        .into_iter()
        .enumerate()
        .map(|(i, t)| (t, i.into()))
        .collect();
    let (normalizer, pre) = match layout {
        "llama2" => (
            serde_json::json!({"type": "Sequence", "normalizers": [
                {"type": "Prepend", "prepend": "▁"},
                {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}),
            serde_json::Value::Null,
        ),
        "metaspace" => (
            serde_json::Value::Null,
            serde_json::json!({"type": "Metaspace", "replacement": "▁",
                "prepend_scheme": "first", "split": false}),
        ),
        _ => (
            serde_json::Value::Null,
            serde_json::json!({"type": "Metaspace", "replacement": "▁",
                "prepend_scheme": "always", "split": true}),
        ),
    };
    let special = |id: u32, content: &str| {
        serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true})
    };
    serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [special(0, "<unk>"), special(1, "<s>"), special(2, "</s>")],
        "normalizer": normalizer,
        "pre_tokenizer": pre,
        "post_processor": null,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>",
            "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": true,
            "byte_fallback": true, "ignore_merges": false, "vocab": vocab, "merges": merges}
    })
    .to_string()
}

/// A tiny Llama whose folder holds `tokenizer_json`, loaded.
fn spm_folder(dir: &Path, tokenizer_json: &str) -> Checkpoint {
    let src = dir.join("tokenizer-src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("tokenizer.json"), tokenizer_json).unwrap();
    std::fs::write(
        src.join("tokenizer_config.json"),
        r#"{"add_bos_token": true, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}"#,
    )
    .unwrap();
    let mut cfg = ModelConfig::tiny_for_tests();
    cfg.vocab_size = 280;
    let config = serde_json::to_value(&cfg).unwrap();
    let tokenizer = crate::tokenizer::load_hf_tokenizer(&src, &config)
        .unwrap()
        .unwrap();
    let model = Transformer::random(&cfg, 3, &Device::Cpu).unwrap();
    let checkpoint = Checkpoint {
        path: "spm".into(),
        format: Format::HfFolder,
        config,
        tensors: model.named_tensors().into(),
        tokenizer: Some(tokenizer),
        generation_config: None,
        side_files: Default::default(),
    };
    let hf = dir.join("hf");
    save_hf(&checkpoint, &hf, SaveDType::F32).unwrap();
    load(&hf).unwrap()
}

/// A SentencePiece-style folder becomes a `llama` GGUF vocabulary (scores, byte tokens, space
/// prefix) that tokenizes as the folder's own tokenizer does, through GGUF and back to a folder.
#[test]
fn sentencepiece_style_folders_become_llama_gguf_vocabularies() {
    let texts = [
        "the theatre hath a that",
        "  two  spaces, a tab\tand\nnewlines\n",
        "naïve ☃ 12 — <s> <0x41> end",
        "",
    ];
    for layout in ["llama2", "metaspace"] {
        let dir = tempfile::tempdir().unwrap();
        let folder = spm_folder(dir.path(), &spm_tokenizer_json(layout));
        let tok = folder.tokenizer().unwrap();
        let vocab = tok.gguf_vocab.as_ref().unwrap();
        assert_eq!(
            (vocab.model.as_str(), vocab.pre.as_deref()),
            ("llama", Some("default"))
        );
        assert!(vocab.add_space_prefix && vocab.merges.is_empty());
        let id = |t: &str| vocab.tokens.iter().position(|x| x == t).unwrap();
        // Types: unknown, control, byte, normal, and unused padding up to vocab_size.
        let types: Vec<i32> = [0, 1, 3 + 0x41, id("▁t"), 279]
            .iter()
            .map(|&i| vocab.token_types[i])
            .collect();
        assert_eq!(types, vec![2, 3, 6, 1, 5]);
        assert_eq!(
            (vocab.tokens[279].as_str(), vocab.tokens.len()),
            ("[PAD279]", 280)
        );
        // Minus the rank of the first merge that makes the piece ("▁the": rank 2, not 7).
        let score = |t: &str| vocab.scores[id(t)];
        assert_eq!(
            (
                score("▁t"),
                score("he"),
                score("▁the"),
                score("▁th"),
                score("t")
            ),
            (0.0, -1.0, -2.0, -5.0, 0.0)
        );
        assert_eq!(vocab.unknown_token_id, Some(0));

        let gguf = dir.path().join("spm.gguf");
        write_llama_gguf(&folder, &gguf, GgufWriteType::F32, &Default::default()).unwrap();
        let from_gguf = load(&gguf).unwrap();
        assert_eq!(
            from_gguf.tokenizer().unwrap().gguf_vocab.as_ref(),
            Some(vocab)
        );
        let back = dir.path().join("back");
        save_hf(&from_gguf, &back, SaveDType::F32).unwrap();
        let back = load(&back).unwrap();
        for text in texts {
            let ids = tok.encode(text, false).unwrap();
            assert_eq!(ids[0], 1, "BOS first");
            for other in [&from_gguf, &back] {
                let t = other.tokenizer().unwrap();
                let theirs = t.encode(text, false).unwrap();
                if layout == "metaspace" && text.starts_with(' ') {
                    // Hugging Face's Metaspace puts no `▁` before a text that starts with a space;
                    // SentencePiece and llama.cpp do.
                    assert_eq!(theirs[..2], [1, id("▁") as u32]);
                    assert_eq!(theirs[2..], ids[1..], "{layout}: {text:?}");
                    continue;
                }
                assert_eq!(theirs, ids, "{layout}: {text:?}");
                assert_eq!(
                    t.decode(&ids, false).unwrap(),
                    tok.decode(&ids, false).unwrap()
                );
            }
        }
        let ids = tok.encode("the ☃", false).unwrap();
        let pieces: Vec<&str> = ids
            .iter()
            .map(|&i| vocab.tokens[i as usize].as_str())
            .collect();
        assert_eq!(pieces, ["<s>", "▁the", "▁", "<0xE2>", "<0x98>", "<0x83>"]);
        assert_eq!(tok.decode(&ids, false).unwrap(), "the ☃");
    }
    // A Metaspace that splits words apart cannot be llama.cpp's (it merges across spaces).
    let dir = tempfile::tempdir().unwrap();
    let folder = spm_folder(dir.path(), &spm_tokenizer_json("split"));
    let e = err_of(gguf_vocab_of(&folder).map(|_| ()));
    assert!(
        e.contains("tokenizer.json") && e.contains("Metaspace"),
        "{e}"
    );
}

#[test]
fn gguf_writer_streams_the_bytes_candle_writes_and_refuses_misuse() {
    use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
    let t = |dtype, rows: usize, cols: usize, seed: f32| {
        let v: Vec<f32> = (0..rows * cols)
            .map(|i| ((i as f32 + seed) * 0.37).sin())
            .collect();
        let t = Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap();
        QTensor::quantize(&t, dtype).unwrap()
    };
    // Sizes that need padding (3 × 5 f32 = 60 bytes) and block types.
    let tensors = [
        ("a.weight", t(GgmlDType::F32, 3, 5, 0.0)),
        ("b.weight", t(GgmlDType::Q4_0, 2, 64, 1.0)),
        ("c.weight", t(GgmlDType::F16, 4, 32, 2.0)),
    ];
    let metadata = [
        ("general.name".to_string(), GgufValue::String("x".into())),
        ("k".to_string(), GgufValue::U32(7)),
    ];
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.gguf");
    let plan: Vec<GgufEntry> = tensors
        .iter()
        .map(|(n, q)| GgufEntry {
            name: n.to_string(),
            dtype: crate::ggml::from_candle(q.dtype()),
            dims: q.shape().dims().to_vec(),
        })
        .collect();
    let mut w = GgufWriter::create(&path, &metadata, plan.clone()).unwrap();
    for (n, q) in &tensors {
        assert!(!path.exists(), "the file appears only when finished");
        w.append(n, &q.data().unwrap()).unwrap();
    }
    w.finish().unwrap();
    let ours = std::fs::read(&path).unwrap();
    // candle's own writer (version 2) is an independent implementation of the same layout.
    let mut theirs = std::io::Cursor::new(Vec::new());
    let values = [
        gguf_file::Value::String("x".into()),
        gguf_file::Value::U32(7),
    ];
    gguf_file::write(
        &mut theirs,
        &[("general.name", &values[0]), ("k", &values[1])],
        &tensors.iter().map(|(n, q)| (*n, q)).collect::<Vec<_>>(),
    )
    .unwrap();
    let theirs = theirs.into_inner();
    assert_eq!(ours.len(), theirs.len());
    assert_eq!(&ours[4..8], &3u32.to_le_bytes());
    assert_eq!(&ours[8..], &theirs[8..]);
    assert_eq!(
        load_layout(&path),
        check_gguf_layout(&path, &theirs).unwrap().tensors.len()
    );

    // Out of order, wrong size, unplanned, unfinished: errors naming the tensor, no file.
    let bad = dir.path().join("bad.gguf");
    let data = tensors[1].1.data().unwrap();
    let mut w = GgufWriter::create(&bad, &metadata, plan.clone()).unwrap();
    let e = err_of(w.append("b.weight", &data));
    assert!(
        e.contains("b.weight") && e.contains("'a.weight' comes next"),
        "{e}"
    );
    let e = err_of(w.append("a.weight", &data));
    assert!(e.contains("a.weight") && e.contains("bytes of data"), "{e}");
    w.append("a.weight", &tensors[0].1.data().unwrap()).unwrap();
    let e = err_of(w.finish());
    assert!(
        e.contains("b.weight") && e.contains("never written (1 of 3"),
        "{e}"
    );
    assert!(!bad.exists());
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers, vec![std::ffi::OsString::from("s.gguf")]);
    let e = GgufWriter::create(
        &bad,
        &metadata,
        vec![GgufEntry {
            name: "q".into(),
            dtype: crate::ggml::GgmlType::Q4_0,
            dims: vec![2, 40],
        }],
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("'q'") && e.contains("whole blocks of 32"), "{e}");
}

fn load_layout(path: &Path) -> usize {
    check_gguf_layout(path, &std::fs::read(path).unwrap())
        .unwrap()
        .tensors
        .len()
}

/// Every tensor of `all` as an F32 entry, in order.
fn f32_plan(all: &BTreeMap<String, Tensor>) -> Vec<SafetensorsEntry> {
    all.iter()
        .map(|(name, t)| SafetensorsEntry {
            name: name.clone(),
            dtype: safetensors::Dtype::F32,
            shape: t.dims().to_vec(),
        })
        .collect()
}

#[test]
fn sharded_writer_splits_as_hugging_face_and_reads_back() {
    let (_, c) = tiny_checkpoint();
    let all = c.tensors.load_all().unwrap();
    let plan = f32_plan(&all);
    let dir = tempfile::tempdir().unwrap();
    let staged = shrink_core::AtomicDir::new(&dir.path().join("m")).unwrap();
    // 3 KB shards: tensors fill a shard in order, and one larger than that gets its own.
    let mut w = ShardedWriter::create(staged.path(), plan.clone(), 3_000).unwrap();
    for (name, t) in &all {
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        w.append(name, &bytes).unwrap();
    }
    let files = w.finish().unwrap();
    let config = c.config.clone();
    write_json_for_tests(staged.path(), &config);
    save_hf_files(&c, staged.path(), &config).unwrap();
    let out = staged.commit().unwrap();
    assert!(files.len() > 2, "{files:?}");
    assert_eq!(
        files[0],
        format!("model-00001-of-{:05}.safetensors", files.len())
    );
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    for f in &files {
        let bytes = std::fs::read(out.join(f)).unwrap();
        let header = u64::from_le_bytes(bytes[..8].try_into().unwrap());
        let data = bytes.len() as u64 - header - 8;
        let held = index["weight_map"]
            .as_object()
            .unwrap()
            .values()
            .filter(|v| v.as_str() == Some(f.as_str()))
            .count();
        assert!(
            data <= 3_000 || held == 1,
            "{f}: {data} bytes in {held} tensors"
        );
    }
    let loaded = load(&out).unwrap();
    assert_eq!(loaded.tensors.len(), all.len());
    for (name, t) in &all {
        assert_eq!(
            max_diff(t, &loaded.tensors.get(name).unwrap()),
            0.0,
            "{name}"
        );
    }
    // One shard: a plain model.safetensors, no index.
    let one = dir.path().join("one");
    std::fs::create_dir(&one).unwrap();
    let mut w = ShardedWriter::create(&one, plan[..1].to_vec(), MAX_SHARD_BYTES).unwrap();
    let e = err_of(w.append(&plan[1].name, &[]));
    assert!(e.contains("comes next"), "{e}");
    let e = err_of(w.append(&plan[0].name, &[0u8; 3]));
    assert!(e.contains("bytes of data"), "{e}");
    let e = err_of(
        ShardedWriter::create(&one, plan[..1].to_vec(), MAX_SHARD_BYTES)
            .unwrap()
            .finish(),
    );
    assert!(e.contains("never written"), "{e}");
    let names: Vec<_> = std::fs::read_dir(&one).unwrap().collect();
    assert!(names.is_empty(), "nothing is left behind");
}

/// A resumable sharded folder "killed" (dropped unfinished, its partial files kept) at every
/// point, after more tensors than it recorded, then resumed from the record: the same files as
/// a folder written in one go, and nothing else in the folder.
#[test]
fn a_resumed_sharded_folder_is_the_uninterrupted_one() {
    let (_, c) = tiny_checkpoint();
    let all = c.tensors.load_all().unwrap();
    let plan = f32_plan(&all);
    let data: Vec<Vec<u8>> = all
        .values()
        .map(|t| {
            let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            v.iter().flat_map(|x| x.to_le_bytes()).collect()
        })
        .collect();
    let names: Vec<&String> = all.keys().collect();
    let files = |dir: &Path| -> BTreeMap<String, Vec<u8>> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let name = e.file_name().to_string_lossy().into_owned();
                (name, std::fs::read(e.path()).unwrap())
            })
            .collect()
    };
    let tmp = tempfile::tempdir().unwrap();
    let whole = tmp.path().join("whole");
    std::fs::create_dir(&whole).unwrap();
    let mut w = ShardedWriter::create(&whole, plan.clone(), 3_000).unwrap();
    for (name, d) in names.iter().zip(&data) {
        w.append(name, d).unwrap();
    }
    w.finish().unwrap();
    let expected = files(&whole);
    assert!(expected.len() > 3, "several shards: {:?}", expected.keys());
    for recorded in 0..=plan.len() {
        for beyond in [0, 1, 3] {
            let killed = (recorded + beyond).min(plan.len());
            let dir = tmp.path().join(format!("resumed-{recorded}-{beyond}"));
            std::fs::create_dir(&dir).unwrap();
            let mut w = ShardedWriter::resume(&dir, plan.clone(), 3_000, 0).unwrap();
            for (i, (name, d)) in names.iter().zip(&data).enumerate().take(killed) {
                w.append(name, d).unwrap();
                if i + 1 == recorded {
                    assert_eq!(w.sync().unwrap().0, recorded);
                }
            }
            drop(w);
            let mut w = ShardedWriter::resume(&dir, plan.clone(), 3_000, recorded).unwrap();
            for (name, d) in names.iter().zip(&data).skip(recorded) {
                w.append(name, d).unwrap();
            }
            w.finish().unwrap();
            assert!(
                files(&dir) == expected,
                "recorded {recorded}, killed after {killed}"
            );
        }
    }
    // A record the files do not back (a shard gone) is an error naming the file.
    let dir = tmp.path().join("gone");
    std::fs::create_dir(&dir).unwrap();
    let mut w = ShardedWriter::resume(&dir, plan.clone(), 3_000, 0).unwrap();
    for (name, d) in names.iter().zip(&data) {
        w.append(name, d).unwrap();
    }
    drop(w);
    let first = dir.join(expected.keys().next().unwrap());
    std::fs::remove_file(&first).unwrap();
    let e = err_of(ShardedWriter::resume(&dir, plan.clone(), 3_000, plan.len()).map(|_| ()));
    assert!(e.contains("model-00001-of"), "{e}");
}

fn write_json_for_tests(dir: &Path, value: &serde_json::Value) {
    std::fs::write(dir.join("config.json"), value.to_string()).unwrap();
}

#[test]
fn finiteness_is_read_from_each_float_types_exponent_bits() {
    use candle_core::{DType, Device, Tensor};
    let finite = [1.0f32, -2.5, 0.0, -0.0, 65504.0, 1e-30];
    for dtype in [DType::F32, DType::F16, DType::BF16, DType::F64] {
        let t = Tensor::new(&finite[..], &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        assert!(super::all_finite(&t).unwrap(), "{dtype:?}");
        // A strided view (the transpose) is read in its own order too.
        let m = t.reshape((2, 3)).unwrap().t().unwrap();
        assert!(super::all_finite(&m).unwrap(), "{dtype:?}");
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut v = vec![0.5f32; 5000];
            v[4999] = bad;
            let t = Tensor::new(v, &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            assert!(!super::all_finite(&t).unwrap(), "{dtype:?} {bad}");
            // Outside a narrowed view the value does not count.
            assert!(super::all_finite(&t.narrow(0, 0, 4999).unwrap()).unwrap());
        }
    }
}
