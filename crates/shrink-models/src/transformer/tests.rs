//! The model checked against a straightforward scalar implementation written from the equations.

use super::*;

fn cpu() -> Device {
    Device::Cpu
}

fn vec2(t: &Tensor) -> Vec<Vec<f32>> {
    t.to_dtype(DType::F32).unwrap().to_vec2().unwrap()
}

fn vec1(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32).unwrap().to_vec1().unwrap()
}

/// y = x·Wᵀ (+ b) on plain vectors.
fn linear_ref(x: &[f32], w: &[Vec<f32>], b: Option<&Vec<f32>>) -> Vec<f32> {
    w.iter()
        .enumerate()
        .map(|(o, row)| {
            let dot: f64 = row.iter().zip(x).map(|(a, b)| *a as f64 * *b as f64).sum();
            dot as f32 + b.map(|b| b[o]).unwrap_or(0.0)
        })
        .collect()
}

fn rms_ref(x: &[f32], w: &[f32], eps: f64) -> Vec<f32> {
    let ms: f64 = x.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / x.len() as f64;
    let r = 1.0 / (ms + eps).sqrt();
    x.iter()
        .zip(w)
        .map(|(v, g)| (*v as f64 * r) as f32 * g)
        .collect()
}

/// Rotate-half RoPE on one head vector at position `pos`.
fn rope_ref(x: &mut [f32], pos: usize, theta: f64) {
    let d = x.len();
    for i in 0..d / 2 {
        let angle = pos as f64 / theta.powf(2.0 * i as f64 / d as f64);
        let (c, s) = (angle.cos(), angle.sin());
        let (x1, x2) = (x[i] as f64, x[i + d / 2] as f64);
        x[i] = (x1 * c - x2 * s) as f32;
        x[i + d / 2] = (x2 * c + x1 * s) as f32;
    }
}

fn gelu_tanh(x: f64) -> f64 {
    0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh())
}

/// Logits of one sequence computed token by token from the equations, from the checkpoint's
/// tensors: Llama, Mistral (`window`), Qwen2 (biases), Qwen3 (QK-norm) and Gemma 3 (norms
/// applied as `1 + w` before and after each sub-layer, QK-norm, GeGLU, the embedding × √hidden,
/// `layer_types` choosing each layer's window and RoPE base, `query_pre_attn_scalar`).
fn reference_logits(model: &Transformer, tokens: &[u32], window: Option<usize>) -> Vec<Vec<f32>> {
    let cfg = &model.config;
    let w = model.checkpoint_tensors().unwrap();
    let m2 = |n: &str| vec2(&w[n]);
    let m1 = |n: &str| vec1(&w[n]);
    let gemma = cfg.model_type == "gemma3_text";
    // Gemma's norms scale by 1 + w.
    let norm_w = |n: &str| -> Vec<f32> {
        m1(n)
            .into_iter()
            .map(|v| if gemma { 1.0 + v } else { v })
            .collect()
    };
    let (nh, nkv, hd) = (cfg.num_attention_heads, cfg.num_kv_heads(), cfg.head_dim());
    let embed = m2("model.embed_tokens.weight");
    let embed_scale = if gemma {
        (cfg.hidden_size as f64).sqrt() as f32
    } else {
        1.0
    };
    let mut xs: Vec<Vec<f32>> = tokens
        .iter()
        .map(|&t| embed[t as usize].iter().map(|v| v * embed_scale).collect())
        .collect();
    let score_scale = 1.0 / cfg.query_pre_attn_scalar.unwrap_or(hd as f64).sqrt();
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        let (window, theta) = match &cfg.layer_types {
            Some(types) if types[l] == "sliding_attention" => (
                cfg.sliding_window,
                cfg.rope_local_base_freq.unwrap_or(cfg.rope_theta),
            ),
            Some(_) => (None, cfg.rope_theta),
            None => (window, cfg.rope_theta),
        };
        let bias = |n: &str| w.get(&format!("{p}.self_attn.{n}.bias")).map(vec1);
        let (wq, wk, wv, wo) = (
            m2(&format!("{p}.self_attn.q_proj.weight")),
            m2(&format!("{p}.self_attn.k_proj.weight")),
            m2(&format!("{p}.self_attn.v_proj.weight")),
            m2(&format!("{p}.self_attn.o_proj.weight")),
        );
        let (bq, bk, bv, bo) = (
            bias("q_proj"),
            bias("k_proj"),
            bias("v_proj"),
            bias("o_proj"),
        );
        let qk_norm = ["q_norm", "k_norm"].map(|n| {
            let name = format!("{p}.self_attn.{n}.weight");
            w.contains_key(&name).then(|| norm_w(&name))
        });
        let ln1 = norm_w(&format!("{p}.input_layernorm.weight"));
        let mut qs = vec![];
        let mut ks = vec![];
        let mut vs = vec![];
        for (pos, x) in xs.iter().enumerate() {
            let h = rms_ref(x, &ln1, cfg.rms_norm_eps);
            let mut q = linear_ref(&h, &wq, bq.as_ref());
            let mut k = linear_ref(&h, &wk, bk.as_ref());
            for (v, norm) in [(&mut q, &qk_norm[0]), (&mut k, &qk_norm[1])] {
                for head in v.chunks_mut(hd) {
                    if let Some(g) = norm {
                        let normed = rms_ref(head, g, cfg.rms_norm_eps);
                        head.copy_from_slice(&normed);
                    }
                    rope_ref(head, pos, theta);
                }
            }
            qs.push(q);
            ks.push(k);
            vs.push(linear_ref(&h, &wv, bv.as_ref()));
        }
        let mut new_xs = vec![];
        for i in 0..xs.len() {
            let mut attn = vec![0f32; nh * hd];
            for head in 0..nh {
                let kvh = head / (nh / nkv);
                let q = &qs[i][head * hd..(head + 1) * hd];
                let lo = window.map(|w| (i + 1).saturating_sub(w)).unwrap_or(0);
                let scores: Vec<f64> = (lo..=i)
                    .map(|j| {
                        let k = &ks[j][kvh * hd..(kvh + 1) * hd];
                        q.iter()
                            .zip(k)
                            .map(|(a, b)| *a as f64 * *b as f64)
                            .sum::<f64>()
                            * score_scale
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::MIN, f64::max);
                let exps: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let z: f64 = exps.iter().sum();
                for (e, j) in exps.iter().zip(lo..=i) {
                    for d in 0..hd {
                        attn[head * hd + d] += (e / z * vs[j][kvh * hd + d] as f64) as f32;
                    }
                }
            }
            let mut o = linear_ref(&attn, &wo, bo.as_ref());
            if gemma {
                o = rms_ref(
                    &o,
                    &norm_w(&format!("{p}.post_attention_layernorm.weight")),
                    cfg.rms_norm_eps,
                );
            }
            let x: Vec<f32> = xs[i].iter().zip(&o).map(|(a, b)| a + b).collect();
            let mlp_norm = if gemma {
                "pre_feedforward_layernorm"
            } else {
                "post_attention_layernorm"
            };
            let h = rms_ref(
                &x,
                &norm_w(&format!("{p}.{mlp_norm}.weight")),
                cfg.rms_norm_eps,
            );
            let g = linear_ref(&h, &m2(&format!("{p}.mlp.gate_proj.weight")), None);
            let u = linear_ref(&h, &m2(&format!("{p}.mlp.up_proj.weight")), None);
            let a: Vec<f32> = g
                .iter()
                .zip(&u)
                .map(|(g, u)| {
                    let g = *g as f64;
                    let act = if gemma {
                        gelu_tanh(g)
                    } else {
                        g / (1.0 + (-g).exp())
                    };
                    act as f32 * u
                })
                .collect();
            let mut dn = linear_ref(&a, &m2(&format!("{p}.mlp.down_proj.weight")), None);
            if gemma {
                dn = rms_ref(
                    &dn,
                    &norm_w(&format!("{p}.post_feedforward_layernorm.weight")),
                    cfg.rms_norm_eps,
                );
            }
            new_xs.push(x.iter().zip(&dn).map(|(a, b)| a + b).collect());
        }
        xs = new_xs;
    }
    let head = w.get("lm_head.weight").map(vec2).unwrap_or(embed);
    let norm = norm_w("model.norm.weight");
    xs.iter()
        .map(|x| linear_ref(&rms_ref(x, &norm, cfg.rms_norm_eps), &head, None))
        .collect()
}

/// The largest difference between two sets of logit rows.
fn max_abs_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    crate::testing::max_abs_diff(a.iter().flatten(), b.iter().flatten())
}

fn batch_logits(model: &Transformer, batch: &[Vec<u32>]) -> Vec<Vec<Vec<f32>>> {
    let ids = Tensor::new(batch.to_vec(), &cpu()).unwrap();
    model.forward(&ids).unwrap().to_vec3().unwrap()
}

#[test]
fn gqa_forward_matches_scalar_reference_with_batch() {
    let cfg = ModelConfig::tiny_for_tests();
    assert_eq!(
        cfg.num_attention_heads / cfg.num_kv_heads(),
        2,
        "grouped-query attention"
    );
    let model = Transformer::random(&cfg, 7, &cpu()).unwrap();
    let batch = vec![
        vec![3u32, 17, 9, 40, 2, 63, 11],
        vec![5, 5, 60, 1, 0, 22, 31],
    ];
    let logits = batch_logits(&model, &batch);
    for (seq, got) in batch.iter().zip(&logits) {
        let want = reference_logits(&model, seq, None);
        let diff = max_abs_diff(got, &want);
        assert!(diff < 1e-4, "max abs diff {diff}");
    }
}

#[test]
fn qwen2_biases_tied_embeddings_and_head_dim_match_reference() {
    let mut cfg = ModelConfig::tiny_for_tests();
    cfg.model_type = "qwen2".into();
    cfg.architectures = vec!["Qwen2ForCausalLM".into()];
    cfg.tie_word_embeddings = true;
    cfg.head_dim = Some(6);
    cfg.rope_theta = 1_000_000.0;
    let model = Transformer::random(&cfg, 3, &cpu()).unwrap();
    assert!(model
        .named_tensors()
        .contains_key("model.layers.1.self_attn.k_proj.bias"));
    assert!(!model.named_tensors().contains_key("lm_head.weight"));
    let seq = vec![1u32, 2, 3, 50, 4];
    let got = &batch_logits(&model, std::slice::from_ref(&seq))[0];
    assert!(max_abs_diff(got, &reference_logits(&model, &seq, None)) < 1e-4);
}

#[test]
fn qwen3_qk_norm_without_biases_matches_reference() {
    let cfg = ModelConfig::tiny_qwen3_for_tests();
    let model = Transformer::random(&cfg, 11, &cpu()).unwrap();
    let names = model.named_tensors();
    assert_eq!(
        names["model.layers.1.self_attn.q_norm.weight"].dims(),
        [12],
        "QK-norm is head_dim wide"
    );
    assert!(!names.contains_key("model.layers.0.self_attn.q_proj.bias"));
    let batch = vec![vec![1u32, 2, 3, 50, 4, 33], vec![7u32, 7, 60, 0, 12, 5]];
    let logits = batch_logits(&model, &batch);
    for (seq, got) in batch.iter().zip(&logits) {
        let diff = max_abs_diff(got, &reference_logits(&model, seq, None));
        assert!(diff < 1e-4, "max abs diff {diff}");
    }
    // The norms matter: with q_norm's scale doubled the logits move.
    let mut doubled = model.clone();
    let q_norm = doubled.blocks[0].q_norm.as_mut().unwrap();
    q_norm.weight = (&q_norm.weight * 2.0).unwrap();
    let moved = batch_logits(&doubled, &batch[..1]);
    assert!(max_abs_diff(&moved[0], &logits[0]) > 1e-3);
}

#[test]
fn gemma3_matches_reference() {
    let cfg = ModelConfig::tiny_gemma3_for_tests();
    let model = Transformer::random(&cfg, 13, &cpu()).unwrap();
    assert_eq!(
        model.blocks.iter().map(|b| b.sliding).collect::<Vec<_>>(),
        [true, false, true]
    );
    let names = model.named_tensors();
    for n in [
        "input_layernorm",
        "post_attention_layernorm",
        "pre_feedforward_layernorm",
        "post_feedforward_layernorm",
    ] {
        assert_eq!(names[&format!("model.layers.2.{n}.weight")].dims(), [32]);
    }
    let batch = vec![
        vec![3u32, 17, 9, 40, 2, 63, 11, 8],
        vec![5, 5, 60, 1, 0, 22, 31, 30],
    ];
    let logits = batch_logits(&model, &batch);
    for (seq, got) in batch.iter().zip(&logits) {
        let diff = max_abs_diff(got, &reference_logits(&model, seq, None));
        assert!(diff < 1e-3, "max abs diff {diff}");
    }
    // Each ingredient matters: a reference without the window, or with one RoPE base, or
    // without the embedding scale, differs.
    let mut variants = vec![];
    let mut c = cfg.clone();
    c.sliding_window = Some(100);
    variants.push(c);
    let mut c = cfg.clone();
    c.rope_local_base_freq = None;
    variants.push(c);
    let mut c = cfg.clone();
    c.query_pre_attn_scalar = None;
    variants.push(c);
    for c in variants {
        let mut other = model.clone();
        other.config = c.clone();
        let want = reference_logits(&other, &batch[0], None);
        assert!(max_abs_diff(&logits[0], &want) > 1e-3, "{c:?}");
    }
    // Decoding with the KV cache gives the full forward's logits.
    let seq = &batch[1];
    let mut cache = model.new_cache();
    for (i, &tok) in seq.iter().enumerate() {
        let ids = Tensor::new(&[[tok]], &cpu()).unwrap();
        let step = model.forward_cached(&ids, &mut cache).unwrap();
        let step: Vec<f32> = step.flatten_all().unwrap().to_vec1().unwrap();
        let diff = crate::testing::max_abs_diff(&step, &logits[1][i]);
        assert!(diff < 1e-3, "position {i}: {diff}");
    }
}

#[test]
fn mistral_sliding_window_matches_reference() {
    let mut cfg = ModelConfig::tiny_for_tests();
    cfg.model_type = "mistral".into();
    cfg.sliding_window = Some(3);
    let model = Transformer::random(&cfg, 5, &cpu()).unwrap();
    let seq = vec![9u32, 8, 7, 6, 5, 4, 3, 2];
    let got = &batch_logits(&model, std::slice::from_ref(&seq))[0];
    assert!(max_abs_diff(got, &reference_logits(&model, &seq, Some(3))) < 1e-4);
    // The window matters: without it the last logits differ.
    let full = reference_logits(&model, &seq, None);
    assert!(max_abs_diff(&got[7..], &full[7..]) > 1e-4);
}

#[test]
fn causal_mask_hides_future_tokens() {
    let model = Transformer::random(&ModelConfig::tiny_for_tests(), 1, &cpu()).unwrap();
    let a = batch_logits(&model, &[vec![1, 2, 3, 4, 5, 6]]);
    let b = batch_logits(&model, &[vec![1, 2, 3, 40, 50, 60]]);
    assert_eq!(
        a[0][..3],
        b[0][..3],
        "positions before the change are bit-identical"
    );
    assert!(max_abs_diff(&a[0][3..], &b[0][3..]) > 1e-3);
}

#[test]
fn kv_cache_decoding_matches_full_forward() {
    let model = Transformer::random(&ModelConfig::tiny_for_tests(), 2, &cpu()).unwrap();
    let seq = vec![4u32, 8, 15, 16, 23, 42, 7];
    let full = &batch_logits(&model, std::slice::from_ref(&seq))[0];
    let mut cache = model.new_cache();
    let prefill = Tensor::new(vec![seq[..3].to_vec()], &cpu()).unwrap();
    let last = model.forward_cached(&prefill, &mut cache).unwrap();
    assert!(max_abs_diff(&vec2(&last), &full[2..3]) < 1e-5);
    for (i, &tok) in seq.iter().enumerate().skip(3) {
        let step = Tensor::new(&[[tok]], &cpu()).unwrap();
        let logits = model.forward_cached(&step, &mut cache).unwrap();
        assert!(
            max_abs_diff(&vec2(&logits), &full[i..i + 1]) < 1e-5,
            "position {i}"
        );
    }
    assert_eq!(cache[0].len(), seq.len());
}

#[test]
fn rms_norm_matches_hand_computation() {
    let norm = Norm {
        weight: Tensor::new(&[1f32, 2.0, 0.5, 1.0], &cpu()).unwrap(),
        bias: None,
        eps: 0.0,
        offset: 0.0,
    };
    let x = Tensor::new(&[[1f32, 2.0, 3.0, 4.0]], &cpu()).unwrap();
    // mean(x²) = 7.5, so x / sqrt(7.5) * w.
    let r = 1.0 / 7.5f32.sqrt();
    let got = vec2(&norm.forward(&x).unwrap());
    let want = [r, 4.0 * r, 1.5 * r, 4.0 * r];
    for (g, w) in got[0].iter().zip(want) {
        assert!((g - w).abs() < 1e-6);
    }
}

#[test]
fn rope_rotates_pairs_by_position_times_frequency() {
    let mut cfg = ModelConfig::tiny_for_tests();
    cfg.hidden_size = 16;
    cfg.num_attention_heads = 4;
    cfg.num_key_value_heads = Some(4);
    let model = Transformer::random(&cfg, 0, &cpu()).unwrap();
    let ctx = model.attention_context(3, 0).unwrap();
    // head_dim 4: frequencies 1 and 1/100. Position 2, x = (1, 0, 0, 1) (pairs are (x0, x2), (x1, x3)).
    let x = Tensor::new(&[1f32, 0.0, 0.0, 1.0], &cpu()).unwrap();
    let x = Tensor::stack(&[&x, &x, &x], 0)
        .unwrap()
        .reshape((1, 1, 3, 4))
        .unwrap();
    let (cos, sin) = ctx.rope.as_ref().unwrap();
    let y = candle_nn::rotary_emb::rope(&x, cos, sin).unwrap();
    let y: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
    let (a, b) = (2.0f32, 0.02f32);
    let want = [a.cos(), -b.sin(), a.sin(), b.cos()];
    for (g, w) in y[8..12].iter().zip(want) {
        assert!((g - w).abs() < 1e-6, "{g} vs {w}");
    }
}

#[test]
fn hooks_see_every_linear_input() {
    struct Recorder(Vec<(String, Vec<usize>)>, Option<Tensor>);
    impl LinearHook for Recorder {
        fn observe(&mut self, name: &str, input: &Tensor) -> candle_core::Result<()> {
            if name == "model.layers.0.self_attn.q_proj" {
                self.1 = Some(input.clone());
            }
            self.0.push((name.to_string(), input.dims().to_vec()));
            Ok(())
        }
    }
    let cfg = ModelConfig::tiny_for_tests();
    let model = Transformer::random(&cfg, 4, &cpu()).unwrap();
    let ids = Tensor::new(&[[1u32, 2, 3], [4, 5, 6]], &cpu()).unwrap();
    let mut rec = Recorder(vec![], None);
    model.forward_hidden(&ids, &mut rec).unwrap();
    let names: Vec<&str> = rec.0.iter().map(|(n, _)| n.as_str()).collect();
    // The blocks' linears in execution order; lm_head's input is forward_hidden's output itself.
    let expected: Vec<String> = model.linear_names();
    assert_eq!(expected.last().unwrap(), "lm_head");
    assert_eq!(
        names,
        expected[..expected.len() - 1]
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
    );
    let down = rec
        .0
        .iter()
        .find(|(n, _)| n.ends_with("1.mlp.down_proj"))
        .unwrap();
    assert_eq!(down.1, vec![2, 3, cfg.intermediate_size]);
    // The first q_proj input is the first block's normalised embedding.
    let want = model.blocks[0]
        .attn_norm
        .forward(&model.embed(&ids).unwrap())
        .unwrap();
    let diff = (rec.1.unwrap() - want)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap();
    assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
}

#[test]
fn block_by_block_execution_equals_forward() {
    let model = Transformer::random(&ModelConfig::tiny_for_tests(), 9, &cpu()).unwrap();
    let ids = Tensor::new(&[[7u32, 1, 9, 12]], &cpu()).unwrap();
    let ctx = model.attention_context(4, 0).unwrap();
    let mut x = model.embed(&ids).unwrap();
    for block in &model.blocks {
        x = block.forward(&x, &ctx, None, &mut NoHook).unwrap();
    }
    let logits = model.lm_head(&model.final_hidden(&x).unwrap()).unwrap();
    let full = model.forward(&ids).unwrap();
    let diff = (logits - full).unwrap().abs().unwrap().max_all().unwrap();
    assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
}

#[test]
fn weights_can_be_swapped_by_name() {
    let mut model = Transformer::random(&ModelConfig::tiny_for_tests(), 6, &cpu()).unwrap();
    let ids = Tensor::new(&[[1u32, 2, 3]], &cpu()).unwrap();
    let before = vec2(&model.forward(&ids).unwrap().squeeze(0).unwrap());
    let name = "model.layers.1.mlp.up_proj";
    let zeros = model
        .linear_mut(name)
        .unwrap()
        .weight()
        .zeros_like()
        .unwrap();
    model.linear_mut(name).unwrap().set_weight(zeros).unwrap();
    let after = vec2(&model.forward(&ids).unwrap().squeeze(0).unwrap());
    assert!(max_abs_diff(&before, &after) > 1e-4);
    let wrong = Tensor::zeros((3, 3), DType::F32, &cpu()).unwrap();
    assert!(model.linear_mut(name).unwrap().set_weight(wrong).is_err());
    assert!(model.linear_mut("model.layers.9.mlp.up_proj").is_err());
    assert!(model.linear_mut("model.layers.0.mlp.sideways").is_err());
    assert_eq!(
        model.named_tensors()[&format!("{name}.weight")]
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
        0.0
    );
}

#[test]
fn bf16_forward_stays_close_to_f32() {
    let cfg = ModelConfig::tiny_for_tests();
    let model = Transformer::random(&cfg, 8, &cpu()).unwrap();
    let bf16 = Transformer::from_tensors(&cfg, model.named_tensors(), DType::BF16).unwrap();
    assert_eq!(bf16.dtype(), DType::BF16);
    let ids = Tensor::new(&[[1u32, 2, 3, 4]], &cpu()).unwrap();
    let a = vec2(&model.forward(&ids).unwrap().squeeze(0).unwrap());
    let b = vec2(&bf16.forward(&ids).unwrap().squeeze(0).unwrap());
    let diff = max_abs_diff(&a, &b);
    assert!(diff < 0.05 && diff > 0.0, "bf16 diff {diff}");
}

#[test]
fn bad_weights_and_configs_are_named() {
    let cfg = ModelConfig::tiny_for_tests();
    let good = Transformer::random(&cfg, 0, &cpu())
        .unwrap()
        .named_tensors();

    let mut missing = good.clone();
    missing.remove("model.layers.1.mlp.gate_proj.weight");
    let err = Transformer::from_tensors(&cfg, missing, DType::F32)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("missing tensor 'model.layers.1.mlp.gate_proj.weight'"),
        "{err}"
    );

    let mut wrong = good.clone();
    wrong.insert(
        "model.layers.0.self_attn.k_proj.weight".into(),
        Tensor::zeros((32, 32), DType::F32, &cpu()).unwrap(),
    );
    let err = Transformer::from_tensors(&cfg, wrong, DType::F32)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("model.layers.0.self_attn.k_proj.weight") && err.contains("[16, 32]"),
        "{err}"
    );

    let mut extra = good.clone();
    extra.insert(
        "model.layers.0.mlp.extra.weight".into(),
        Tensor::zeros(2, DType::F32, &cpu()).unwrap(),
    );
    let err = Transformer::from_tensors(&cfg, extra, DType::F32)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("unexpected tensor 'model.layers.0.mlp.extra.weight'"),
        "{err}"
    );

    let mut json = serde_json::to_value(&cfg).unwrap();
    json["model_type"] = "gpt_neox".into();
    json["architectures"] = serde_json::json!(["GPTNeoXForCausalLM"]);
    let err = ModelConfig::from_json(&json).unwrap_err().to_string();
    assert!(err.contains("unsupported architecture 'gpt_neox'"), "{err}");

    let mut json = serde_json::to_value(&cfg).unwrap();
    json["num_key_value_heads"] = 3.into();
    let err = ModelConfig::from_json(&json).unwrap_err().to_string();
    assert!(err.contains("multiple of num_key_value_heads"), "{err}");

    let mut json = serde_json::to_value(&cfg).unwrap();
    json.as_object_mut().unwrap().remove("hidden_size");
    let err = ModelConfig::from_json(&json).unwrap_err().to_string();
    assert!(err.contains("hidden_size"), "{err}");

    let mut json = serde_json::to_value(&cfg).unwrap();
    json["rope_scaling"] = serde_json::json!({"type": "yarn", "factor": 4.0});
    assert!(ModelConfig::from_json(&json)
        .unwrap_err()
        .to_string()
        .contains("yarn"));
}

#[test]
fn llama3_rope_scaling_changes_low_frequencies_only() {
    let mut cfg = ModelConfig::tiny_for_tests();
    let plain = cfg.rope_inv_freq().unwrap();
    cfg.rope_scaling = Some(serde_json::json!({"rope_type": "llama3", "factor": 8.0,
        "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}));
    let scaled = cfg.rope_inv_freq().unwrap();
    assert_eq!(plain[0], scaled[0], "the highest frequency is kept");
    let last = plain.len() - 1;
    assert!(
        (scaled[last] - plain[last] / 8.0).abs() < 1e-12,
        "the lowest is divided by factor"
    );
}

#[test]
fn int8_per_token_activation_quantization_by_hand() {
    // Row 1: scale 2/127; x/scale = 63.5, -127, 31.75 → 64, -127, 32 (round half away from 0).
    // Row 2 is all zeros and stays zero.
    let x = Tensor::new(&[[1f32, -2.0, 0.5], [0.0, 0.0, 0.0]], &cpu()).unwrap();
    let q = vec2(&ActQuant::Int8PerToken.fake_quantize(&x).unwrap());
    let s = 2.0f32 / 127.0;
    assert_eq!(q[0], vec![64.0 * s, -127.0 * s, 32.0 * s]);
    assert_eq!(q[1], vec![0.0; 3]);
    // A linear with activation quantization sees the quantized rows.
    let w = Tensor::new(&[[1f32, 1.0, 1.0]], &cpu()).unwrap();
    let mut l = Linear::new(w, None);
    l.set_act_quant(Some(ActQuant::Int8PerToken));
    let y = vec2(&l.forward(&x).unwrap());
    assert!((y[0][0] - (64.0 - 127.0 + 32.0) * s).abs() < 1e-6);
}

#[test]
fn gradients_flow_through_the_differentiable_path_and_match_finite_differences() {
    let cfg = ModelConfig::tiny_for_tests();
    let model = Transformer::random(&cfg, 3, &cpu()).unwrap();
    let ids = Tensor::new(&[[1u32, 5, 9, 2, 7, 7, 3], [4, 4, 8, 1, 0, 6, 2]], &cpu()).unwrap();
    let vars: BTreeMap<String, candle_core::Var> = model
        .named_tensors()
        .into_iter()
        .map(|(k, t)| (k, candle_core::Var::from_tensor(&t).unwrap()))
        .collect();
    let tracked = Transformer::from_tensors(
        &cfg,
        vars.iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect(),
        DType::F32,
    )
    .unwrap();
    // The composed (differentiable) ops compute what the fused kernels do.
    let fast = model.forward(&ids).unwrap().flatten_to(1).unwrap();
    let slow = tracked.forward(&ids).unwrap().flatten_to(1).unwrap();
    let d = max_abs_diff(&vec2(&fast), &vec2(&slow.detach()));
    assert!(d < 1e-4, "{d}");
    let loss = tracked.lm_loss(&ids).unwrap();
    let grads = loss.backward().unwrap();
    for v in vars.values() {
        let g = grads
            .get(v.as_tensor())
            .expect("every parameter gets a gradient");
        assert!(
            g.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                > 0.0
        );
    }
    // Central differences on a few weights of different kinds.
    let base = model.named_tensors();
    for (name, index) in [
        ("model.layers.0.self_attn.q_proj.weight", 37),
        ("model.layers.1.mlp.down_proj.weight", 101),
        ("model.layers.0.input_layernorm.weight", 5),
        ("model.embed_tokens.weight", 9 * 32 + 3),
    ] {
        let g: Vec<f32> = grads
            .get(vars[name].as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let h = 1e-2f32;
        let loss_at = |delta: f32| -> f64 {
            let mut t = base.clone();
            let shape = t[name].dims().to_vec();
            let mut flat: Vec<f32> = t[name].flatten_all().unwrap().to_vec1().unwrap();
            flat[index] += delta;
            t.insert(name.into(), Tensor::from_vec(flat, shape, &cpu()).unwrap());
            let m = Transformer::from_tensors(&cfg, t, DType::F32).unwrap();
            m.lm_loss(&ids).unwrap().to_scalar::<f32>().unwrap() as f64
        };
        let fd = (loss_at(h) - loss_at(-h)) / (2.0 * h as f64);
        let rel = (fd - g[index] as f64).abs() / fd.abs().max(1e-3);
        assert!(
            rel < 0.05,
            "{name}[{index}]: finite difference {fd} vs gradient {}",
            g[index]
        );
    }
}

fn layer_norm_ref(x: &[f32], w: &[f32], b: &[f32], eps: f64) -> Vec<f32> {
    let n = x.len() as f64;
    let mean: f64 = x.iter().map(|v| *v as f64).sum::<f64>() / n;
    let var: f64 = x.iter().map(|v| (*v as f64 - mean).powi(2)).sum::<f64>() / n;
    let r = 1.0 / (var + eps).sqrt();
    x.iter()
        .zip(w.iter().zip(b))
        .map(|(v, (g, s))| ((*v as f64 - mean) * r) as f32 * g + s)
        .collect()
}

fn gelu_tanh_ref(x: f32) -> f32 {
    let x = x as f64;
    let c = (2.0 / std::f64::consts::PI).sqrt();
    (0.5 * x * (1.0 + (c * (x + 0.044715 * x.powi(3))).tanh())) as f32
}

/// `x · W + b` with GPT-2's Conv1D weight `W` stored `[in, out]`.
fn conv1d_ref(x: &[f32], w: &[Vec<f32>], b: &[f32]) -> Vec<f32> {
    (0..b.len())
        .map(|o| {
            let dot: f64 = x
                .iter()
                .zip(w)
                .map(|(xi, row)| *xi as f64 * row[o] as f64)
                .sum();
            dot as f32 + b[o]
        })
        .collect()
}

/// GPT-2 logits computed token by token from the checkpoint's own tensors (Conv1D weights,
/// fused `c_attn`), with no code shared with the model.
fn gpt2_reference_logits(
    cfg: &ModelConfig,
    w: &BTreeMap<String, Tensor>,
    tokens: &[u32],
) -> Vec<Vec<f32>> {
    let m2 = |n: &str| vec2(&w[n]);
    let m1 = |n: &str| vec1(&w[n]);
    let (h, nh) = (cfg.hidden_size, cfg.num_attention_heads);
    let hd = h / nh;
    let eps = cfg.layer_norm_eps.unwrap();
    let (wte, wpe) = (m2("wte.weight"), m2("wpe.weight"));
    let mut xs: Vec<Vec<f32>> = tokens
        .iter()
        .enumerate()
        .map(|(p, &t)| {
            wte[t as usize]
                .iter()
                .zip(&wpe[p])
                .map(|(a, b)| a + b)
                .collect()
        })
        .collect();
    for l in 0..cfg.num_hidden_layers {
        let p = format!("h.{l}");
        let ln = |x: &[f32], n: &str| {
            layer_norm_ref(
                x,
                &m1(&format!("{p}.{n}.weight")),
                &m1(&format!("{p}.{n}.bias")),
                eps,
            )
        };
        let conv = |x: &[f32], n: &str| {
            conv1d_ref(
                x,
                &m2(&format!("{p}.{n}.weight")),
                &m1(&format!("{p}.{n}.bias")),
            )
        };
        let qkv: Vec<Vec<f32>> = xs
            .iter()
            .map(|x| conv(&ln(x, "ln_1"), "attn.c_attn"))
            .collect();
        let mut out = Vec::new();
        for (i, x) in xs.iter().enumerate() {
            let mut attn = vec![0f32; h];
            for head in 0..nh {
                let q = &qkv[i][head * hd..(head + 1) * hd];
                let scores: Vec<f64> = (0..=i)
                    .map(|j| {
                        let k = &qkv[j][h + head * hd..h + (head + 1) * hd];
                        q.iter()
                            .zip(k)
                            .map(|(a, b)| *a as f64 * *b as f64)
                            .sum::<f64>()
                            / (hd as f64).sqrt()
                    })
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = scores.iter().map(|s| (s - max).exp()).sum();
                for (j, s) in scores.iter().enumerate() {
                    let pr = ((s - max).exp() / z) as f32;
                    for d in 0..hd {
                        attn[head * hd + d] += pr * qkv[j][2 * h + head * hd + d];
                    }
                }
            }
            let a = conv(&attn, "attn.c_proj");
            let x: Vec<f32> = x.iter().zip(&a).map(|(u, v)| u + v).collect();
            let m: Vec<f32> = conv(&ln(&x, "ln_2"), "mlp.c_fc")
                .into_iter()
                .map(gelu_tanh_ref)
                .collect();
            let m = conv(&m, "mlp.c_proj");
            out.push(x.iter().zip(&m).map(|(u, v)| u + v).collect());
        }
        xs = out;
    }
    xs.iter()
        .map(|x| {
            let f = layer_norm_ref(x, &m1("ln_f.weight"), &m1("ln_f.bias"), eps);
            linear_ref(&f, &wte, None)
        })
        .collect()
}

#[test]
fn gpt2_matches_a_reference_forward_from_its_conv1d_checkpoint() {
    let cfg = ModelConfig::tiny_gpt2_for_tests();
    let model = Transformer::random(&cfg, 21, &cpu()).unwrap();
    let checkpoint = model.checkpoint_tensors().unwrap();
    // The checkpoint layout: Conv1D `[in, out]` weights and one fused c_attn.
    assert_eq!(checkpoint["h.0.attn.c_attn.weight"].dims(), &[32, 96]);
    assert_eq!(checkpoint["h.1.mlp.c_fc.weight"].dims(), &[32, 48]);
    assert!(!checkpoint.contains_key("h.0.attn.c_attn.q.weight"));
    assert!(!checkpoint.contains_key("lm_head.weight"), "tied to wte");
    let batch = vec![
        vec![3u32, 17, 9, 40, 2, 63, 11],
        vec![5, 5, 60, 1, 0, 22, 31],
    ];
    let logits = batch_logits(&model, &batch);
    for (seq, got) in batch.iter().zip(&logits) {
        let want = gpt2_reference_logits(&cfg, &checkpoint, seq);
        let diff = max_abs_diff(got, &want);
        assert!(diff < 1e-4, "max abs diff {diff}");
    }
    // Loading the checkpoint back (with GPT2LMHeadModel's `transformer.` prefix and a stored
    // copy of the tied head) gives the same model.
    let mut prefixed: BTreeMap<String, Tensor> = checkpoint
        .iter()
        .map(|(n, t)| (format!("transformer.{n}"), t.clone()))
        .collect();
    prefixed.insert("lm_head.weight".into(), model.embed_tokens.clone());
    let json = cfg.to_json().unwrap();
    assert_eq!(json["n_embd"], 32);
    assert!(json.get("hidden_size").is_none());
    let back = ModelConfig::from_json(&json).unwrap();
    assert_eq!(back, cfg);
    let reloaded = Transformer::from_checkpoint(&back, prefixed, DType::F32).unwrap();
    assert_eq!(batch_logits(&reloaded, &batch), logits);
    // Incremental decoding uses the right learned positions.
    let mut cache = reloaded.new_cache();
    let seq = &batch[0];
    let mut last = vec![];
    for (i, &t) in seq.iter().enumerate() {
        let ids = Tensor::new(&[[t]], &cpu()).unwrap();
        last = reloaded
            .forward_cached(&ids, &mut cache)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap()[0]
            .clone();
        assert!(max_abs_diff(&[last.clone()], &[logits[0][i].clone()]) < 1e-4);
    }
    assert_eq!(last.len(), cfg.vocab_size);
}

/// BERT logits-free forward: each sentence alone equals the same sentence inside a right-padded
/// batch (padding is never attended to), and the block matches a scalar post-norm reference.
#[test]
fn bert_padding_is_masked_and_blocks_are_post_norm() {
    let cfg = ModelConfig::tiny_bert_for_tests();
    let model = Transformer::random(&cfg, 5, &cpu()).unwrap();
    let long = vec![2u32, 17, 9, 40, 2, 63, 11, 3];
    let short = vec![2u32, 30, 8, 3];
    let mut padded_short = short.clone();
    padded_short.resize(long.len(), 0);
    let batch = Tensor::new(vec![long.clone(), padded_short], &cpu()).unwrap();
    let both: Vec<Vec<Vec<f32>>> = model.encode(&batch, &[8, 4]).unwrap().to_vec3().unwrap();
    let alone: Vec<Vec<f32>> = model
        .encode(&Tensor::new(vec![short.clone()], &cpu()).unwrap(), &[4])
        .unwrap()
        .to_vec3()
        .unwrap()
        .remove(0);
    assert!(max_abs_diff(&both[1][..4], &alone) < 1e-5);
    // Scalar reference for the one-token-at-a-time equations of a BERT block.
    let w = model.named_tensors();
    let m2 = |n: &str| vec2(&w[n]);
    let m1 = |n: &str| vec1(&w[n]);
    let eps = cfg.layer_norm_eps.unwrap();
    let (h, nh) = (cfg.hidden_size, cfg.num_attention_heads);
    let hd = h / nh;
    let word = m2("embeddings.word_embeddings.weight");
    let pos = m2("embeddings.position_embeddings.weight");
    let seg = m2("embeddings.token_type_embeddings.weight");
    let mut xs: Vec<Vec<f32>> = short
        .iter()
        .enumerate()
        .map(|(p, &t)| {
            let e: Vec<f32> = (0..h)
                .map(|d| word[t as usize][d] + pos[p][d] + seg[0][d])
                .collect();
            layer_norm_ref(
                &e,
                &m1("embeddings.LayerNorm.weight"),
                &m1("embeddings.LayerNorm.bias"),
                eps,
            )
        })
        .collect();
    for l in 0..cfg.num_hidden_layers {
        let p = format!("encoder.layer.{l}");
        let lin = |x: &[f32], n: &str| {
            linear_ref(
                x,
                &m2(&format!("{p}.{n}.weight")),
                Some(&m1(&format!("{p}.{n}.bias"))),
            )
        };
        let ln = |x: &[f32], n: &str| {
            layer_norm_ref(
                x,
                &m1(&format!("{p}.{n}.weight")),
                &m1(&format!("{p}.{n}.bias")),
                eps,
            )
        };
        let q: Vec<_> = xs.iter().map(|x| lin(x, "attention.self.query")).collect();
        let k: Vec<_> = xs.iter().map(|x| lin(x, "attention.self.key")).collect();
        let v: Vec<_> = xs.iter().map(|x| lin(x, "attention.self.value")).collect();
        let mut out = vec![];
        for (i, x) in xs.iter().enumerate() {
            let mut attn = vec![0f32; h];
            for head in 0..nh {
                let r = head * hd..(head + 1) * hd;
                let s: Vec<f64> = (0..xs.len())
                    .map(|j| {
                        q[i][r.clone()]
                            .iter()
                            .zip(&k[j][r.clone()])
                            .map(|(a, b)| *a as f64 * *b as f64)
                            .sum::<f64>()
                            / (hd as f64).sqrt()
                    })
                    .collect();
                let max = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = s.iter().map(|v| (v - max).exp()).sum();
                for (j, sv) in s.iter().enumerate() {
                    for d in r.clone() {
                        attn[d] += ((sv - max).exp() / z) as f32 * v[j][d];
                    }
                }
            }
            let a = lin(&attn, "attention.output.dense");
            let x = ln(
                &x.iter().zip(&a).map(|(u, w)| u + w).collect::<Vec<_>>(),
                "attention.output.LayerNorm",
            );
            let inter: Vec<f32> = lin(&x, "intermediate.dense")
                .into_iter()
                .map(|u| {
                    let u = u as f64;
                    (0.5 * u * (1.0 + erf(u / std::f64::consts::SQRT_2))) as f32
                })
                .collect();
            let m = lin(&inter, "output.dense");
            out.push(ln(
                &x.iter().zip(&m).map(|(u, w)| u + w).collect::<Vec<_>>(),
                "output.LayerNorm",
            ));
        }
        xs = out;
    }
    assert!(
        max_abs_diff(&alone, &xs) < 1e-4,
        "{}",
        max_abs_diff(&alone, &xs)
    );
    assert!(
        model.lm_head(&model.embed(&batch).unwrap()).is_err(),
        "no MLM head"
    );
}

/// erf from its Maclaurin series (to f64 precision for |x| ≤ 5; ±1 beyond).
fn erf(x: f64) -> f64 {
    if x.abs() > 5.0 {
        return x.signum();
    }
    let mut sum = 0.0;
    let mut term = x;
    for n in 0..200 {
        sum += term / (2 * n + 1) as f64;
        term *= -x * x / (n + 1) as f64;
        if term.abs() < 1e-17 {
            break;
        }
    }
    sum * 2.0 / std::f64::consts::PI.sqrt()
}

/// BertForMaskedLM: the checkpoint's `bert.` prefix is removed on load and restored on write, the
/// tied decoder is not stored twice, and the head computes dense → GELU → LayerNorm → word
/// embeddingsᵀ + bias.
#[test]
fn bert_masked_lm_head_matches_its_equations_and_checkpoint_layout() {
    let mut cfg = ModelConfig::tiny_bert_for_tests();
    cfg.architectures = vec!["BertForMaskedLM".into()];
    let model = Transformer::random(&cfg, 9, &cpu()).unwrap();
    let stored = model.checkpoint_tensors().unwrap();
    assert!(stored.contains_key("bert.encoder.layer.1.output.dense.weight"));
    assert!(stored.contains_key("cls.predictions.transform.dense.weight"));
    assert_eq!(
        model
            .checkpoint_name("encoder.layer.0.attention.self.query.weight")
            .unwrap(),
        "bert.encoder.layer.0.attention.self.query.weight"
    );
    let mut with_decoder = stored.clone();
    with_decoder.insert(
        "cls.predictions.decoder.weight".into(),
        model.embed_tokens.clone(),
    );
    let back = Transformer::from_checkpoint(&cfg, with_decoder, DType::F32).unwrap();
    let ids = Tensor::new(&[[2u32, 17, 9, 3]], &cpu()).unwrap();
    let hidden = back.encode(&ids, &[4]).unwrap();
    let logits: Vec<Vec<f32>> = back
        .lm_head(&hidden)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2()
        .unwrap();
    let w = back.named_tensors();
    let h: Vec<Vec<f32>> = hidden.squeeze(0).unwrap().to_vec2().unwrap();
    let eps = cfg.layer_norm_eps.unwrap();
    for (pos, x) in h.iter().enumerate() {
        let t: Vec<f32> = linear_ref(
            x,
            &vec2(&w["cls.predictions.transform.dense.weight"]),
            Some(&vec1(&w["cls.predictions.transform.dense.bias"])),
        )
        .into_iter()
        .map(|u| {
            let u = u as f64;
            (0.5 * u * (1.0 + erf(u / std::f64::consts::SQRT_2))) as f32
        })
        .collect();
        let t = layer_norm_ref(
            &t,
            &vec1(&w["cls.predictions.transform.LayerNorm.weight"]),
            &vec1(&w["cls.predictions.transform.LayerNorm.bias"]),
            eps,
        );
        let want = linear_ref(
            &t,
            &vec2(&w["embeddings.word_embeddings.weight"]),
            Some(&vec1(&w["cls.predictions.bias"])),
        );
        assert!(max_abs_diff(&[want], &[logits[pos].clone()]) < 1e-4);
    }
}

/// transformers writes removed BERT heads as the original head count plus `pruned_heads`; shrink
/// reads that as fewer heads of the same size and writes it back the same way.
#[test]
fn bert_pruned_heads_round_trip_through_config_json() {
    let mut cfg = ModelConfig::tiny_bert_for_tests();
    cfg.num_attention_heads = 3;
    cfg.head_dim = Some(8);
    let keys: BTreeMap<&str, serde_json::Value> = cfg.shape_json().into_iter().collect();
    assert_eq!(keys["num_attention_heads"], 4);
    assert_eq!(keys["pruned_heads"]["1"], serde_json::json!([3]));
    let mut json = serde_json::to_value(&cfg).unwrap();
    for (k, v) in keys {
        json[k] = v;
    }
    json.as_object_mut().unwrap().remove("head_dim");
    let back = ModelConfig::from_json(&json).unwrap();
    assert_eq!(
        (back.num_attention_heads, back.head_dim()),
        (3, 8),
        "{json}"
    );
    json["pruned_heads"] = serde_json::json!({"0": [1], "1": [0, 2]});
    let err = ModelConfig::from_json(&json).unwrap_err().to_string();
    assert!(err.contains("same number"), "{err}");
}

/// The `nn.Linear`s a compressed-tensors `ignore` list names: BERT's pooler (carried through, not
/// a block linear) counts, embedding tables and GPT-2's Conv1D weights do not, and a tied head
/// counts though the file has no weight for it.
#[test]
fn hf_linear_modules_are_the_linears_transformers_builds() {
    let stems = |cfg: &ModelConfig, extra: &[(&str, Vec<usize>)]| {
        let model = Transformer::random(cfg, 1, &cpu()).unwrap();
        let mut tensors: Vec<(String, Vec<usize>)> = model
            .checkpoint_tensors()
            .unwrap()
            .into_iter()
            .map(|(n, t)| (n, t.dims().to_vec()))
            .collect();
        tensors.extend(extra.iter().map(|(n, s)| (n.to_string(), s.clone())));
        cfg.hf_linear_modules(tensors.iter().map(|(n, s)| (n.as_str(), &s[..])))
    };
    let block = |cfg: &ModelConfig| -> Vec<String> {
        let mut names: Vec<String> = cfg.block_linears().into_iter().map(|(n, _)| n).collect();
        names.sort();
        names
    };

    let bert = ModelConfig::tiny_bert_for_tests();
    let pooler = [
        ("pooler.dense.weight", vec![32, 32]),
        ("pooler.dense.bias", vec![32]),
    ];
    let mut want = block(&bert);
    want.push("pooler.dense".into());
    assert_eq!(stems(&bert, &pooler), want);

    let mut llama = ModelConfig::tiny_for_tests();
    let mut want = block(&llama);
    want.insert(0, "lm_head".into());
    assert_eq!(stems(&llama, &[]), want, "untied: its lm_head.weight");
    llama.tie_word_embeddings = true;
    assert_eq!(stems(&llama, &[]), want, "tied: no weight, still a module");

    let gpt2 = ModelConfig::tiny_gpt2_for_tests();
    assert_eq!(stems(&gpt2, &[]), vec!["lm_head".to_string()]);
}

/// Folding input scales (AWQ, SmoothQuant) leaves a Gemma 3 block's float function unchanged:
/// its norms are applied as `1 + w`, so a folded scale rescales `1 + w`, not `w`.
#[test]
fn scale_folding_keeps_gemma3_and_qwen3_outputs() {
    for cfg in [
        ModelConfig::tiny_gemma3_for_tests(),
        ModelConfig::tiny_qwen3_for_tests(),
    ] {
        let model = Transformer::random(&cfg, 17, &cpu()).unwrap();
        let batch = vec![vec![3u32, 17, 9, 40, 2, 63, 11, 8]];
        let want = batch_logits(&model, &batch);
        let mut folded = model.clone();
        for block in &mut folded.blocks {
            for group in block.scale_groups() {
                let role = group.consumers[0];
                let n = block.linear(role).unwrap().weight().dim(1).unwrap();
                let s: Vec<f32> = (0..n).map(|i| 0.5 + (i % 7) as f32 * 0.25).collect();
                block.fold_input_scale(&group, &s).unwrap();
            }
        }
        let got = batch_logits(&folded, &batch);
        let diff = max_abs_diff(&got[0], &want[0]);
        assert!(diff < 1e-4, "{}: {diff}", cfg.model_type);
        assert!(
            crate::testing::max_abs_diff(
                &vec1(&folded.blocks[0].attn_norm.weight),
                &vec1(&model.blocks[0].attn_norm.weight)
            ) > 0.1,
            "the scales were folded"
        );
    }
}

/// transformers 5 writes `rope_parameters` (per attention kind for Gemma 3): read as the bases
/// they name; a layer kind shrink does not know is refused; `layer_types` follow kept layers.
#[test]
fn rope_parameters_and_layer_types_are_read() {
    let mut json = ModelConfig::tiny_gemma3_for_tests().to_json().unwrap();
    let map = json.as_object_mut().unwrap();
    map.remove("rope_theta");
    map.remove("rope_local_base_freq");
    map.insert(
        "rope_parameters".into(),
        serde_json::json!({
            "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}
        }),
    );
    let cfg = ModelConfig::from_json(&json).unwrap();
    assert_eq!((cfg.rope_theta, cfg.rope_local_base_freq), (1e6, Some(1e4)));
    let mut qwen = ModelConfig::tiny_qwen3_for_tests().to_json().unwrap();
    qwen["rope_parameters"] = serde_json::json!({"rope_type": "default", "rope_theta": 5e5});
    assert_eq!(ModelConfig::from_json(&qwen).unwrap().rope_theta, 5e5);
    json["rope_parameters"] = serde_json::json!({"chunked_attention": {"rope_theta": 1.0}});
    let e = ModelConfig::from_json(&json).unwrap_err().to_string();
    assert!(e.contains("chunked_attention"), "{e}");
    let kept = cfg.with_layers(&[1, 2]);
    assert_eq!(
        kept.layer_types.unwrap(),
        ["full_attention", "sliding_attention"]
    );
    let shape = cfg.with_layers(&[1]).shape_json();
    assert!(shape
        .iter()
        .any(|(k, v)| *k == "layer_types" && v.as_array().unwrap().len() == 1));
}
