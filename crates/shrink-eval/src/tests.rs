use super::*;
use candle_core::{DType, Device, D};
use shrink_core::NoProgress;
use shrink_models::ModelConfig;

fn tiny() -> Transformer {
    Transformer::random(&ModelConfig::tiny_for_tests(), 21, &Device::Cpu).unwrap()
}

fn text(n: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 37 + i / 3) % 64) as u32).collect()
}

fn cfg(protocol: Protocol, ctx: usize, chunks: Option<usize>, batch: usize) -> EvalConfig {
    EvalConfig {
        protocol,
        ctx,
        chunks,
        batch,
    }
}

#[test]
fn llama_cpp_chunks_follow_perplexity_cpp() {
    let t = text(100);
    let c = make_chunks(&t, None, &cfg(Protocol::LlamaCpp, 16, None, 4)).unwrap();
    assert_eq!(c.len(), 6, "100 / 16 whole chunks");
    assert_eq!(c[1].ids, t[16..32].to_vec());
    assert_eq!(c[0].first_scored, 8);
    // With BOS, llama.cpp's token list starts with it: chunk k is list[16k..16k+16], its first
    // token replaced by BOS.
    let c = make_chunks(&t, Some(63), &cfg(Protocol::LlamaCpp, 16, Some(2), 4)).unwrap();
    assert_eq!(c.len(), 2);
    assert_eq!(c[0].ids[1..], t[..15]);
    assert_eq!(c[1].ids[0], 63, "first token replaced by BOS");
    assert_eq!(c[1].ids[1..], t[16..31]);
    let c = make_chunks(&t[..31], Some(63), &cfg(Protocol::LlamaCpp, 16, None, 4)).unwrap();
    assert_eq!(c.len(), 2, "31 tokens and BOS are two chunks");
    let err = make_chunks(&t[..31], None, &cfg(Protocol::LlamaCpp, 16, None, 4)).unwrap_err();
    assert!(err.to_string().contains("needs at least 32"), "{err}");
}

#[test]
fn full_chunks_cover_every_token_after_the_first() {
    let t = text(40);
    let c = make_chunks(&t, None, &cfg(Protocol::Full, 16, None, 4)).unwrap();
    assert_eq!(
        c.iter().map(|c| c.ids.len()).collect::<Vec<_>>(),
        vec![16, 16, 8]
    );
    assert!(c.iter().all(|c| c.first_scored == 0));
    let c = make_chunks(&t, Some(1), &cfg(Protocol::Full, 16, None, 4)).unwrap();
    assert_eq!(c[0].ids[0], 1);
    assert_eq!(c[0].ids[1..], t[..15]);
    assert_eq!(
        c.iter().map(|c| c.ids.len() - 1).sum::<usize>(),
        40,
        "every text token is a target"
    );
}

#[test]
fn uniform_logits_give_perplexity_equal_to_vocab_size() {
    let mut model = tiny();
    // A zero output projection makes every next-token distribution uniform over 64 tokens.
    let mut tensors = model.named_tensors();
    let head = tensors["lm_head.weight"].zeros_like().unwrap();
    tensors.insert("lm_head.weight".into(), head);
    model = Transformer::from_tensors(&model.config, tensors, DType::F32).unwrap();
    let r = evaluate(
        &model,
        None,
        &text(64),
        None,
        &cfg(Protocol::Full, 16, None, 2),
        &NoProgress,
    )
    .unwrap();
    assert!(
        (r.perplexity.ppl - 64.0).abs() < 1e-9,
        "{}",
        r.perplexity.ppl
    );
    assert_eq!(r.tokens_scored, 60);
    assert_eq!(r.perplexity.ppl_stderr, 0.0);
}

/// NLL of the scored positions computed from full logits with candle's own log-softmax.
fn direct_nll(model: &Transformer, chunk: &[u32], first: usize) -> Vec<f64> {
    let ids = Tensor::new(chunk, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let lp =
        candle_nn::ops::log_softmax(&model.forward(&ids).unwrap().squeeze(0).unwrap(), D::Minus1)
            .unwrap();
    let lp: Vec<Vec<f32>> = lp.to_vec2().unwrap();
    (first..chunk.len() - 1)
        .map(|p| -(lp[p][chunk[p + 1] as usize] as f64))
        .collect()
}

#[test]
fn perplexity_matches_direct_computation_for_any_batch() {
    let model = tiny();
    let t = text(200);
    let mut all = vec![];
    for i in 0..200 / 32 {
        all.extend(direct_nll(&model, &t[i * 32..(i + 1) * 32], 16));
    }
    let want = (all.iter().sum::<f64>() / all.len() as f64).exp();
    for batch in [1, 3, 8] {
        let r = evaluate(
            &model,
            None,
            &t,
            None,
            &cfg(Protocol::LlamaCpp, 32, None, batch),
            &NoProgress,
        )
        .unwrap();
        assert_eq!(r.tokens_scored, all.len());
        assert!(
            (r.perplexity.ppl / want - 1.0).abs() < 1e-5,
            "batch {batch}: {} vs {want}",
            r.perplexity.ppl
        );
        assert_eq!(r.perplexity.chunk_ppl.len(), 6);
        assert_eq!(r.tokens_processed, 6 * 32);
    }
}

#[test]
fn fidelity_is_zero_against_itself_and_matches_direct_kl() {
    let model = tiny();
    let t = text(64);
    let c = cfg(Protocol::LlamaCpp, 32, None, 2);
    let same = evaluate(&model, Some(&model), &t, None, &c, &NoProgress)
        .unwrap()
        .fidelity
        .unwrap();
    assert!(same.kl_mean.abs() < 1e-12 && same.top1_agreement == 1.0);

    let mut other = model.clone();
    let w = other.linear_mut("model.layers.0.mlp.down_proj").unwrap();
    let noisy = (w.weight() * 3.0).unwrap();
    w.set_weight(noisy).unwrap();
    let r = evaluate(&other, Some(&model), &t, None, &c, &NoProgress).unwrap();
    let f = r.fidelity.unwrap();
    // Direct KL(ref || model) over the same positions.
    let lp = |m: &Transformer, chunk: &[u32]| -> Vec<Vec<f32>> {
        let ids = Tensor::new(chunk, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        candle_nn::ops::log_softmax(&m.forward(&ids).unwrap().squeeze(0).unwrap(), D::Minus1)
            .unwrap()
            .to_vec2()
            .unwrap()
    };
    let mut kls = vec![];
    for chunk in t.chunks(32) {
        let (a, b) = (lp(&model, chunk), lp(&other, chunk));
        for p in 16..31 {
            kls.push(
                a[p].iter()
                    .zip(&b[p])
                    .map(|(r, m)| (*r as f64).exp() * (*r as f64 - *m as f64))
                    .sum::<f64>(),
            );
        }
    }
    let want = kls.iter().sum::<f64>() / kls.len() as f64;
    assert!(want > 1e-4);
    assert!(
        (f.kl_mean / want - 1.0).abs() < 1e-3,
        "{} vs {want}",
        f.kl_mean
    );
    assert!(f.top1_agreement < 1.0 + 1e-12);
    let ref_alone = evaluate(&model, None, &t, None, &c, &NoProgress).unwrap();
    assert!((f.reference_ppl / ref_alone.perplexity.ppl - 1.0).abs() < 1e-9);
}

#[test]
fn bad_inputs_are_errors() {
    let model = tiny();
    let mut t = text(64);
    t[40] = 64;
    let err = evaluate(
        &model,
        None,
        &t,
        None,
        &EvalConfig {
            ctx: 16,
            ..Default::default()
        },
        &NoProgress,
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("token id 64 at position 40"),
        "{err}"
    );

    let mut tensors = model.named_tensors();
    let nan = (tensors["model.norm.weight"].ones_like().unwrap() * f64::NAN).unwrap();
    tensors.insert("model.norm.weight".into(), nan);
    let broken = Transformer::from_tensors(&model.config, tensors, DType::F32).unwrap();
    let err = evaluate(
        &broken,
        None,
        &text(64),
        None,
        &cfg(Protocol::Full, 16, None, 1),
        &NoProgress,
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("non-finite logits in chunk 0"),
        "{err}"
    );
    assert!("nope".parse::<Protocol>().is_err());
}

/// candle-transformers' quantized Llama reads a GGUF written by shrink (Q/K rows permuted back to
/// llama.cpp's layout, interleaved RoPE) and continues a prompt exactly as shrink's own model does.
#[test]
fn candle_quantized_llama_reads_shrink_gguf_and_agrees() {
    let vocab = shrink_io::GgufVocab::byte_level(&["<s>", "</s>"], &[], Some("smollm"));
    let mut config = ModelConfig::tiny_for_tests();
    config.vocab_size = vocab.tokens.len();
    let model = Transformer::random(&config, 9, &Device::Cpu).unwrap();
    let tokenizer = shrink_io::TokenizerBundle::from_gguf_vocab(
        std::path::Path::new("tiny"),
        vocab,
        Some(0),
        Some(1),
        false,
        None,
    )
    .unwrap();
    let checkpoint = shrink_io::Checkpoint {
        path: "tiny".into(),
        format: shrink_io::Format::HfFolder,
        config: serde_json::to_value(&config).unwrap(),
        tensors: model.named_tensors().into(),
        tokenizer: Some(tokenizer),
        generation_config: None,
        side_files: Default::default(),
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    shrink_io::write_llama_gguf(
        &checkpoint,
        &path,
        shrink_io::GgufWriteType::F32,
        &Default::default(),
    )
    .unwrap();
    let prompt: Vec<u32> = (0..12).map(|i| (i * 29 % 200 + 3) as u32).collect();
    let bytes = std::fs::read(&path).unwrap();
    let quantized = quantized_decode_speed(&bytes, &path, &prompt, 16, 3).unwrap();
    // Repeated runs start new sequences (a cache kept across runs would change the tokens,
    // which is an error): the f32 model decodes the same continuation.
    let ours = decode_speed(&model, &prompt, 16, 3).unwrap();
    assert_eq!(quantized.backend, "candle-quantized");
    assert_eq!(quantized.tokens.len(), 17);
    assert_eq!(quantized.tokens, ours.tokens);
    assert!(quantized.decode_ms_per_token > 0.0 && quantized.prefill_tokens_per_s > 0.0);
    assert_eq!((quantized.repeats, ours.repeats), (3, 3));
    assert!(quantized.decode_spread >= 1.0 && quantized.prefill_spread >= 1.0);
    assert_eq!(
        ours.load.is_some(),
        std::path::Path::new("/proc/stat").exists()
    );
    // A cut file is refused, naming it.
    let err = quantized_decode_speed(&bytes[..bytes.len() / 2], &path, &prompt, 1, 1).unwrap_err();
    assert!(err.to_string().contains("tiny.gguf"), "{err}");

    // A Q8_0 file: shrink's model multiplying its blocks (activations rounded to 8-bit blocks, as
    // llama.cpp and candle's quantized kernels do) decodes candle's continuation.
    let q8 = dir.path().join("tiny-q8_0.gguf");
    let q8_type = shrink_io::GgufWriteType::Q8_0;
    shrink_io::write_llama_gguf(&checkpoint, &q8, q8_type, &Default::default()).unwrap();
    let file = shrink_io::load(&q8).unwrap();
    let mut packed = Transformer::from_checkpoint(
        &ModelConfig::from_json(&file.config).unwrap(),
        file.load_finite().unwrap(),
        DType::F32,
    )
    .unwrap();
    assert!(!packed.multiplies_packed());
    assert!(packed.set_packed(&*file.packed_source()).unwrap() > 0);
    assert!(packed.multiplies_packed());
    let integer = decode_speed(&packed, &prompt, 16, 2).unwrap();
    let bytes = std::fs::read(&q8).unwrap();
    let candle = quantized_decode_speed(&bytes, &q8, &prompt, 16, 1).unwrap();
    assert_eq!(integer.backend, "shrink-integer");
    assert_eq!(integer.tokens, candle.tokens);
}

#[test]
fn sentences_split_dedupe_and_skip_short_ones() {
    let text = "To be, or not to be. That is the question!\n\nAy me.  Whether 'tis nobler\nin the mind to suffer?  To be, or not to be.";
    assert_eq!(
        crate::sentences(text, 4, 10),
        [
            "To be, or not to be.",
            "That is the question!",
            "Whether 'tis nobler in the mind to suffer?"
        ]
    );
    assert_eq!(crate::sentences(text, 4, 1).len(), 1);
}

#[test]
fn neighbours_and_fidelity_by_hand() {
    // Four unit vectors at 0°, 10°, 90° and 100°: each one's nearest other is its 10° partner.
    let v = |deg: f32| vec![deg.to_radians().cos(), deg.to_radians().sin()];
    let e = vec![v(0.0), v(10.0), v(90.0), v(100.0)];
    assert_eq!(crate::neighbours(&e, 1), [[1], [0], [3], [2]]);
    let same = crate::embedding_fidelity(&e, &e, 1).unwrap();
    assert!((same.cosine_mean - 1.0).abs() < 1e-12 && same.neighbour_agreement == 1.0);
    // Rotating the third vector to 5° makes it 0°'s nearest neighbour (and 100°'s partner 10°...):
    // cosine of the moved one is cos 85°; the other three keep theirs.
    let mut moved = e.clone();
    moved[2] = v(5.0);
    let f = crate::embedding_fidelity(&moved, &e, 1).unwrap();
    let want = (3.0 + 85f64.to_radians().cos()) / 4.0;
    assert!((f.cosine_mean - want).abs() < 1e-6, "{}", f.cosine_mean);
    assert!((f.cosine_min - 85f64.to_radians().cos()).abs() < 1e-6);
    // Neighbours under `moved`: 0→2 (5°), 1→2 (5°), 2→{0,1} tie → 0, 3→1 (90° vs 95°).
    assert_eq!(crate::neighbours(&moved, 1), [[2], [2], [0], [1]]);
    assert_eq!(f.neighbour_agreement, 0.0);
    assert!(crate::embedding_fidelity(&e, &e[..3], 1).is_err());
}

/// Pseudo-perplexity and masked-token accuracy equal a direct computation: mask each inner
/// position, read the MLM head's log-softmax at it.
#[test]
fn masked_lm_scores_equal_a_direct_computation() {
    let mut cfg = ModelConfig::tiny_bert_for_tests();
    cfg.architectures = vec!["BertForMaskedLM".into()];
    let model = Transformer::random(&cfg, 4, &Device::Cpu).unwrap();
    let sentences = vec![vec![2u32, 10, 11, 12, 3], vec![2, 40, 41, 3]];
    let mask = 1u32;
    let got = crate::masked_lm(&model, &sentences, mask, &shrink_core::NoProgress).unwrap();
    let (mut nll, mut hits, mut n) = (0f64, 0usize, 0usize);
    for s in &sentences {
        for p in 1..s.len() - 1 {
            let mut c = s.clone();
            c[p] = mask;
            let ids = Tensor::new(vec![c], &Device::Cpu).unwrap();
            let logits: Vec<f32> = model
                .lm_head(&model.encode(&ids, &[s.len()]).unwrap())
                .unwrap()
                .squeeze(0)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap()[p]
                .clone();
            let max = logits.iter().copied().fold(f32::MIN, f32::max) as f64;
            let z: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
            nll += max + z.ln() - logits[s[p] as usize] as f64;
            let best = (0..logits.len())
                .max_by(|&a, &b| logits[a].total_cmp(&logits[b]).then(b.cmp(&a)))
                .unwrap();
            hits += usize::from(best == s[p] as usize);
            n += 1;
        }
    }
    assert_eq!(got.tokens_scored, 5);
    assert!((got.pseudo_perplexity - (nll / n as f64).exp()).abs() < 1e-3 * got.pseudo_perplexity);
    assert_eq!(got.accuracy, hits as f64 / n as f64);
    let plain = Transformer::random(&ModelConfig::tiny_bert_for_tests(), 4, &Device::Cpu).unwrap();
    assert!(crate::masked_lm(&plain, &sentences, mask, &shrink_core::NoProgress).is_err());
}

use shrink_models::testing::streamed_copy as streamed;

#[test]
fn a_streamed_evaluation_gives_the_whole_model_bits() {
    for tied in [true, false] {
        let mut config = ModelConfig::tiny_for_tests();
        config.tie_word_embeddings = tied;
        let model = Transformer::random(&config, 4, &Device::Cpu).unwrap();
        let mut other = model.clone();
        let w = other.linear_mut("model.layers.1.mlp.up_proj").unwrap();
        let noisy = (w.weight() * 1.5).unwrap();
        w.set_weight(noisy).unwrap();
        let t = text(150);
        // llama.cpp's protocol in batches of 2 of 4 chunks; every token, with a shorter last
        // chunk run on its own context.
        for c in [
            cfg(Protocol::LlamaCpp, 32, None, 3),
            cfg(Protocol::Full, 32, None, 2),
        ] {
            let whole = evaluate(&other, Some(&model), &t, Some(1), &c, &NoProgress).unwrap();
            let got = evaluate_streamed(
                &mut streamed(&other),
                Some(&mut streamed(&model)),
                &t,
                Some(1),
                &c,
                &NoProgress,
            )
            .unwrap();
            assert!(whole.fidelity.as_ref().unwrap().kl_mean > 1e-6);
            let timeless = |r: EvalReport| EvalReport {
                wall_s: 0.0,
                tokens_per_s: 0.0,
                load: None,
                ..r
            };
            assert_eq!(timeless(got), timeless(whole), "tied {tied}, {c:?}");
        }
    }
}

/// 1, 2 and 3 ranks (threads) sharing the batches out give one process's report, whole models
/// and models read block by block, with and without a reference; a rank's error ends every rank.
#[test]
fn an_evaluation_split_across_ranks_gives_one_process_bits() {
    let model = tiny();
    let mut other = model.clone();
    let w = other.linear_mut("model.layers.0.self_attn.o_proj").unwrap();
    let noisy = (w.weight() * 1.3).unwrap();
    w.set_weight(noisy).unwrap();
    let t = text(200);
    let timeless = |r: EvalReport| EvalReport {
        wall_s: 0.0,
        tokens_per_s: 0.0,
        load: None,
        ..r
    };
    let on_ranks =
        |n: usize, f: &(dyn Fn(&shrink_core::ThreadGroup) -> Result<EvalReport> + Sync)| {
            let ranks = shrink_core::ThreadGroup::new(n);
            std::thread::scope(|s| {
                let handles: Vec<_> = ranks.iter().map(|r| s.spawn(move || f(r))).collect();
                handles
                    .into_iter()
                    .map(|h| h.join().unwrap())
                    .collect::<Vec<_>>()
            })
        };
    // 6 batches of llama.cpp's chunks; every token, the last chunk shorter.
    for c in [
        cfg(Protocol::LlamaCpp, 32, None, 1),
        cfg(Protocol::Full, 24, None, 2),
    ] {
        for reference in [None, Some(&model)] {
            let one = timeless(evaluate(&other, reference, &t, Some(1), &c, &NoProgress).unwrap());
            for n in [2, 3] {
                let whole = on_ranks(n, &|r| {
                    evaluate_in(
                        r,
                        &other,
                        reference,
                        &t,
                        Some(1),
                        &c,
                        &mut NoLogits,
                        &NoProgress,
                    )
                });
                let read = on_ranks(n, &|r| {
                    let mut their = reference.map(streamed);
                    evaluate_streamed_in(
                        r,
                        &mut streamed(&other),
                        their.as_mut(),
                        &t,
                        Some(1),
                        &c,
                        &mut NoLogits,
                        &NoProgress,
                    )
                });
                for got in whole.into_iter().chain(read) {
                    assert_eq!(timeless(got.unwrap()), one, "{n} ranks, {c:?}");
                }
            }
        }
    }
    // A model with a NaN weight: every rank reports the non-finite chunk, as one process does.
    let mut broken = model.clone();
    let w = broken.linear_mut("model.layers.1.mlp.down_proj").unwrap();
    let nan = (w.weight() * f64::NAN).unwrap();
    w.set_weight(nan).unwrap();
    let c = cfg(Protocol::LlamaCpp, 32, None, 1);
    let one = evaluate(&broken, None, &t, Some(1), &c, &NoProgress).unwrap_err();
    for got in on_ranks(2, &|r| {
        evaluate_in(
            r,
            &broken,
            None,
            &t,
            Some(1),
            &c,
            &mut NoLogits,
            &NoProgress,
        )
    }) {
        assert_eq!(got.unwrap_err().to_string(), one.to_string());
    }
}

/// Base log-probabilities saved by a whole and by a streamed evaluation are the same file, with
/// llama.cpp's token list (BOS in front); the model scored against it has no divergence, and
/// another model the divergence its reference evaluation measures.
#[test]
fn saved_base_logits_score_models_as_a_reference_does() {
    let model = tiny();
    let mut other = model.clone();
    let w = other.linear_mut("model.layers.1.mlp.up_proj").unwrap();
    let noisy = (w.weight() * 1.4).unwrap();
    w.set_weight(noisy).unwrap();
    let (t, c) = (text(150), cfg(Protocol::LlamaCpp, 32, None, 3));
    let dir = tempfile::tempdir().unwrap();
    let save = |name: &str, streamed_run: bool| {
        let path = dir.path().join(name);
        let llama: Vec<u32> = std::iter::once(1).chain(t.iter().copied()).collect();
        let mut w = BaseWriter::new(&path, 32, 4, &llama).unwrap();
        match streamed_run {
            false => evaluate_in(&Alone, &model, None, &t, Some(1), &c, &mut w, &NoProgress),
            true => {
                let mut m = streamed(&model);
                evaluate_streamed_in(&Alone, &mut m, None, &t, Some(1), &c, &mut w, &NoProgress)
            }
        }
        .unwrap();
        w.finish().unwrap();
        std::fs::read(path).unwrap()
    };
    let whole = save("whole.kld", false);
    assert!(whole == save("streamed.kld", true));
    assert_eq!(
        &whole[20..28],
        &[1, 0, 0, 0, t[0].to_le_bytes()[0], 0, 0, 0]
    );
    let path = dir.path().join("whole.kld");
    let score = |m: &Transformer| {
        let base = BaseLogits::open(&path).unwrap();
        let tokens = base.text_tokens(Some(1)).unwrap().to_vec();
        let mut k = KlAgainstBase::new(base);
        let r = evaluate_in(&Alone, m, None, &tokens, Some(1), &c, &mut k, &NoProgress).unwrap();
        (k.finish(r.chunks).unwrap(), r)
    };
    let (same, _) = score(&model);
    assert!(same.kld.value.abs() < 1e-5 && same.same_top.value == 1.0);
    let (kl, r) = score(&other);
    let exact = evaluate(&other, Some(&model), &t, Some(1), &c, &NoProgress).unwrap();
    let f = exact.fidelity.unwrap();
    assert_eq!(kl.positions, r.tokens_scored);
    assert!(
        f.kl_mean > 1e-4 && (kl.kld.value / f.kl_mean - 1.0).abs() < 1e-3,
        "{} vs {}",
        kl.kld.value,
        f.kl_mean
    );
    assert!((kl.ppl.value / r.perplexity.ppl - 1.0).abs() < 1e-5);
    assert!((kl.same_top.value - f.top1_agreement).abs() < 0.02);
}
