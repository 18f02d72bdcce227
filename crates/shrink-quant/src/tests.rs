use super::*;
use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType, QTensor};
use candle_core::{DType, Device};
use rand::{Rng, SeedableRng};
use shrink_calib::LinearStats;
use shrink_io::ggml::GgmlType;

fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| (0..4).map(|_| rng.gen_range(-1f32..1.0)).sum::<f32>() * 0.05)
        .collect()
}

#[test]
fn rtn_blocks_are_byte_identical_to_llama_cpp_quantizers() {
    // candle's quantizers are bit-compatible ports of ggml-quants.c's reference functions.
    let (rows, cols) = (6, 96);
    let mut w = random(rows * cols, 1);
    w[7] = 0.0; // a group with an exact zero and one all-zero group
    (32..64).for_each(|i| w[i] = 0.0);
    let t = Tensor::from_vec(w.clone(), (rows, cols), &Device::Cpu).unwrap();
    for (scheme, dtype) in [
        (QuantScheme::Q4_0, GgmlDType::Q4_0),
        (QuantScheme::Q4_1, GgmlDType::Q4_1),
        (QuantScheme::Q5_0, GgmlDType::Q5_0),
        (QuantScheme::Q5_1, GgmlDType::Q5_1),
        (QuantScheme::Q8_0, GgmlDType::Q8_0),
    ] {
        let ours = rtn(&w, rows, cols, &scheme, None, "t").unwrap();
        let (ty, bytes) = ours.to_ggml_blocks().unwrap();
        assert_eq!(ty, shrink_io::ggml::from_candle(dtype));
        let theirs = QTensor::quantize(&t, dtype)
            .unwrap()
            .data()
            .unwrap()
            .to_vec();
        assert_eq!(bytes, theirs, "{dtype:?} blocks");
        // And their dequantizer reads our codes as the values we say they are.
        let deq: Vec<f32> = qtensor_from_ggml(dtype, &bytes, vec![rows, cols], &Device::Cpu)
            .unwrap()
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(deq, ours.dequantize(), "{dtype:?} values");
        assert_eq!(ours.size_bytes(), bytes.len());
        // The zeros counted without dequantizing are the dequantized values' zeros.
        assert_eq!(
            ours.zero_fraction(),
            crate::zero_fraction(&deq),
            "{dtype:?}"
        );
    }
    // Groups that are not whole bytes (3 bits per channel of 45) are counted from the codes.
    let odd = QuantScheme {
        bits: 3,
        granularity: Granularity::Channel,
        ..QuantScheme::Q4_1
    };
    let w = [vec![0.0; 45], random(3 * 45, 2)].concat();
    let q = rtn(&w, 4, 45, &odd, None, "t").unwrap();
    assert!(q.zero_fraction() >= 0.25);
    assert_eq!(q.zero_fraction(), crate::zero_fraction(&q.dequantize()));
}

#[test]
fn packed_storage_is_at_the_real_bit_width() {
    for bits in 2..=8u8 {
        let scheme = QuantScheme {
            bits,
            grid: Grid::Asymmetric,
            granularity: Granularity::Group(64),
            search: false,
        };
        let w = random(4 * 128, bits as u64);
        let q = rtn(&w, 4, 128, &scheme, None, "t").unwrap();
        assert_eq!(q.packed.len(), 4 * 128 * bits as usize / 8);
        assert!((q.bits_per_weight() - (bits as f64 + 32.0 / 64.0)).abs() < 1e-12);
        let err = w
            .iter()
            .zip(q.dequantize())
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        let range = 0.4f32;
        assert!(
            err <= range / ((1 << bits) - 1) as f32,
            "bits {bits}: {err}"
        );
    }
    let per_channel = QuantScheme {
        bits: 8,
        grid: Grid::Symmetric,
        granularity: Granularity::Channel,
        search: false,
    };
    assert_eq!(
        rtn(&random(3 * 10, 0), 3, 10, &per_channel, None, "t")
            .unwrap()
            .scales
            .len(),
        3
    );
    let per_tensor = QuantScheme {
        granularity: Granularity::Tensor,
        ..per_channel
    };
    assert_eq!(
        rtn(&random(3 * 10, 0), 3, 10, &per_tensor, None, "t")
            .unwrap()
            .scales
            .len(),
        1
    );
}

/// Inputs with strongly correlated channels (a few latent factors plus noise).
pub(crate) fn correlated_stats(cols: usize, rows: usize, seed: u64) -> LinearStats {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let factors = 6;
    let mix: Vec<f32> = (0..factors * cols)
        .map(|_| rng.gen_range(-1f32..1.0))
        .collect();
    let mut x = Vec::with_capacity(rows * cols);
    for _ in 0..rows {
        let z: Vec<f32> = (0..factors).map(|_| rng.gen_range(-2f32..2.0)).collect();
        for c in 0..cols {
            let scale = 1.0 + (c % 7) as f32;
            x.push(
                scale * (0..factors).map(|f| z[f] * mix[f * cols + c]).sum::<f32>()
                    + rng.gen_range(-0.1f32..0.1),
            );
        }
    }
    let mut stats = LinearStats::new(cols);
    stats
        .accumulate(&Tensor::from_vec(x, (rows, cols), &Device::Cpu).unwrap())
        .unwrap();
    stats
}

#[test]
fn gptq_beats_rtn_on_correlated_inputs_and_is_deterministic() {
    let (rows, cols) = (48, 128);
    let w = random(rows * cols, 7);
    let stats = correlated_stats(cols, 2000, 3);
    let error = |q: &QuantizedTensor| stats.relative_output_error(&w, &q.dequantize()).unwrap();
    let rtn_err = error(&rtn(&w, rows, cols, &QuantScheme::Q4_0, None, "t").unwrap());
    for cfg in [
        GptqConfig {
            damp: 0.01,
            act_order: false,
            static_groups: false,
            ..Default::default()
        },
        GptqConfig {
            damp: 0.01,
            act_order: false,
            static_groups: true,
            ..Default::default()
        },
        GptqConfig {
            damp: 0.01,
            act_order: true,
            static_groups: true,
            ..Default::default()
        },
    ] {
        let q = gptq(&w, rows, cols, &stats, &QuantScheme::Q4_0, &cfg, "t").unwrap();
        let e = error(&q);
        assert!(e < 0.7 * rtn_err, "{cfg:?}: GPTQ {e} vs RTN {rtn_err}");
        assert_eq!(
            q,
            gptq(&w, rows, cols, &stats, &QuantScheme::Q4_0, &cfg, "t").unwrap(),
            "deterministic"
        );
        q.to_ggml_blocks().unwrap();
    }
}

#[test]
fn gptq_into_k_and_i_quant_blocks_beats_imatrix_rtn() {
    // GPTQ keeps the importance-weighted quantizer's block scales and only chooses codes, so it
    // must beat that quantizer on the layer objective; and with dynamic super-blocks too.
    let (rows, cols) = (24, 512);
    let w = random(rows * cols, 5);
    let stats = correlated_stats(cols, 3000, 9);
    let imp: Vec<f32> = (0..cols)
        .map(|i| stats.hessian[i * cols + i] as f32)
        .collect();
    let error = |q: &GgmlTensor| {
        stats
            .relative_output_error(&w, &q.dequantize().unwrap())
            .unwrap()
    };
    let kinds = KQuant::ALL
        .map(CodeBlocks::K)
        .into_iter()
        .chain(IQuant::ALL.map(CodeBlocks::I));
    for k in kinds {
        let rtn_err =
            error(&GgmlTensor::quantize(&w, rows, cols, k.ggml(), Some(&imp), "t").unwrap());
        for act_order in [false, true] {
            let cfg = GptqConfig {
                damp: 0.01,
                act_order,
                static_groups: act_order,
                ..Default::default()
            };
            let q = gptq_blocks(&w, rows, cols, &stats, k, &cfg, "t").unwrap();
            let e = error(&q);
            assert!(
                e < 0.8 * rtn_err,
                "{k:?} {cfg:?}: GPTQ {e} vs imatrix RTN {rtn_err}"
            );
            assert_eq!(q.bytes.len(), rows * cols / k.block_len() * k.block_bytes());
            assert_eq!(
                q,
                gptq_blocks(&w, rows, cols, &stats, k, &cfg, "t").unwrap()
            );
        }
    }
}

#[test]
fn gptq_equals_rtn_when_inputs_are_uncorrelated() {
    // H = c·I: no error can be compensated, so GPTQ (static groups, no reordering) is RTN.
    let (rows, cols) = (8, 64);
    let w = random(rows * cols, 11);
    let mut stats = LinearStats::new(cols);
    (0..cols).for_each(|i| stats.hessian[i * cols + i] = 5.0);
    let cfg = GptqConfig {
        damp: 0.01,
        act_order: false,
        static_groups: true,
        ..Default::default()
    };
    let g = gptq(&w, rows, cols, &stats, &QuantScheme::Q4_0, &cfg, "t").unwrap();
    assert_eq!(
        g,
        rtn(&w, rows, cols, &QuantScheme::Q4_0, None, "t").unwrap()
    );
}

#[test]
fn bad_weights_and_schemes_name_the_tensor() {
    let mut w = random(64, 0);
    w[9] = f32::NAN;
    let e = rtn(&w, 2, 32, &QuantScheme::Q4_0, None, "blk.3.attn_q")
        .unwrap_err()
        .to_string();
    assert!(e.contains("blk.3.attn_q") && e.contains("index 9"), "{e}");
    // Past the first chunk the test reads at once: still the exact index.
    let mut w = random(2 * 4096 + 64, 0);
    w[5000] = f32::NEG_INFINITY;
    let e = rtn(&w, 2, 4128, &QuantScheme::Q4_0, None, "x").unwrap_err();
    assert!(e.to_string().contains("index 5000"), "{e}");
    let e = rtn(&random(2 * 48, 0), 2, 48, &QuantScheme::Q4_0, None, "x")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("group size 32 does not divide the row length 48"),
        "{e}"
    );
    let nine = QuantScheme {
        bits: 9,
        ..QuantScheme::Q8_0
    };
    assert!(rtn(&random(64, 0), 2, 32, &nine, None, "x").is_err());
    let per_channel = QuantScheme {
        granularity: Granularity::Channel,
        ..QuantScheme::Q4_0
    };
    assert!(rtn(&random(64, 0), 2, 32, &per_channel, None, "x")
        .unwrap()
        .to_ggml_blocks()
        .is_err());
}

#[test]
fn quantize_model_replaces_every_block_linear() {
    use shrink_models::{ModelConfig, Transformer};
    let mut cfg = ModelConfig::tiny_for_tests();
    cfg.intermediate_size = 64; // rows of down_proj must hold whole groups of 32
    let original = Transformer::random(&cfg, 2, &Device::Cpu).unwrap();
    let windows: Vec<Vec<u32>> = (0..4)
        .map(|s| (0..16).map(|i| ((i * 7 + s * 13) % 64) as u32).collect())
        .collect();
    let mut results = vec![];
    for method in [
        Method::Rtn,
        Method::Gptq(GptqConfig::default()),
        Method::Awq {
            grid: 10,
            gptq: None,
        },
    ] {
        let mut model = original.clone();
        let plan = QuantPlan {
            default: QuantScheme::Q4_0.into(),
            rules: vec![Rule::new("layers.1.mlp.down_proj", QuantScheme::Q8_0)],
            fallbacks: vec![],
            activations: None,
        };
        let q = quantize_model(
            &mut model,
            method,
            &plan,
            Some(&windows),
            2,
            &shrink_core::NoProgress,
        )
        .unwrap();
        let ty = |n: &str| q.tensors[n].clone().into_ggml_blocks().unwrap().0;
        assert_eq!(ty("model.layers.1.mlp.down_proj.weight"), GgmlType::Q8_0);
        assert_eq!(ty("model.layers.0.mlp.down_proj.weight"), GgmlType::Q4_0);
        assert_eq!(q.tensors.len(), 2 * 7);
        assert_eq!(q.layers.len(), 14);
        for (name, qt) in &q.tensors {
            let w: Vec<f32> = model.named_tensors()[name]
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert_eq!(
                w,
                qt.dequantize().unwrap(),
                "{name} holds its dequantized value"
            );
        }
        assert_eq!(
            model.named_tensors()["model.embed_tokens.weight"]
                .to_vec2::<f32>()
                .unwrap(),
            original.embed_tokens.to_vec2::<f32>().unwrap()
        );
        let total: f64 = q
            .layers
            .iter()
            .map(|l| l.relative_output_error.unwrap())
            .sum();
        results.push(total);
    }
    assert!(
        results[1] < results[0],
        "GPTQ's summed layer error {} should be below RTN's {}",
        results[1],
        results[0]
    );
}

#[test]
fn awq_folding_keeps_the_float_model_exact_in_every_family() {
    use shrink_models::{ModelConfig, Role, ScaleSite, Transformer};
    for (cfg, sites) in [
        (
            ModelConfig::tiny_for_tests(),
            vec![ScaleSite::AttnNorm, ScaleSite::MlpNorm, ScaleSite::UpRows],
        ),
        (
            ModelConfig::tiny_gpt2_for_tests(),
            vec![ScaleSite::AttnNorm, ScaleSite::VRows, ScaleSite::MlpNorm],
        ),
        (ModelConfig::tiny_bert_for_tests(), vec![ScaleSite::VRows]),
    ] {
        let model = Transformer::random(&cfg, 4, &Device::Cpu).unwrap();
        let mut folded = model.clone();
        for block in folded.blocks.iter_mut() {
            let groups = block.scale_groups();
            assert_eq!(groups.iter().map(|g| g.site).collect::<Vec<_>>(), sites);
            for (k, group) in groups.iter().enumerate() {
                let n = block
                    .linear(group.consumers[0])
                    .unwrap()
                    .weight()
                    .dim(1)
                    .unwrap();
                let s: Vec<f32> = random(n, k as u64)
                    .iter()
                    .map(|v| 0.25 + 8.0 * v.abs())
                    .collect();
                block.fold_input_scale(group, &s).unwrap();
            }
        }
        let changed = |b: &shrink_models::Block, m: &Transformer, r: Role| {
            b.linear(r).unwrap().weight().to_vec2::<f32>().unwrap()
                != m.blocks[0]
                    .linear(r)
                    .unwrap()
                    .weight()
                    .to_vec2::<f32>()
                    .unwrap()
        };
        assert!(changed(&folded.blocks[0], &model, Role::O) == (cfg.model_type != "llama"));
        let ids = Tensor::new(&[[3u32, 9, 27, 17, 51, 1]], &Device::Cpu).unwrap();
        let out = |m: &Transformer| {
            if m.arch.is_encoder() {
                m.encode(&ids, &[6]).unwrap()
            } else {
                m.forward(&ids).unwrap()
            }
        };
        let diff = (out(&model) - out(&folded))
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert!(
            diff.to_scalar::<f32>().unwrap() < 1e-4,
            "{}: {diff}",
            cfg.model_type
        );
    }
}

#[test]
fn awq_scales_never_lose_to_rtn_and_help_with_outlier_channels() {
    // Inputs where a few channels carry much larger activations than the rest.
    let (rows, cols) = (32, 128);
    let w = random(rows * cols, 5);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
    let x: Vec<f32> = (0..4000 * cols)
        .map(|k| rng.gen_range(-1f32..1.0) * if k % cols < 4 { 30.0 } else { 1.0 })
        .collect();
    let mut stats = LinearStats::new(cols);
    stats
        .accumulate(&Tensor::from_vec(x, (4000, cols), &Device::Cpu).unwrap())
        .unwrap();
    let linear = shrink_models::Linear::new(
        Tensor::from_vec(w.clone(), (rows, cols), &Device::Cpu).unwrap(),
        None,
    );
    let s = awq::search_scales(&[&linear], &stats, &QuantScheme::Q4_0, 20, "t").unwrap();
    let rtn_err = stats
        .relative_output_error(
            &w,
            &rtn(&w, rows, cols, &QuantScheme::Q4_0, None, "t")
                .unwrap()
                .dequantize(),
        )
        .unwrap();
    let scaled: Vec<f32> = w.iter().enumerate().map(|(i, v)| v * s[i % cols]).collect();
    let back: Vec<f32> = rtn(&scaled, rows, cols, &QuantScheme::Q4_0, None, "t")
        .unwrap()
        .dequantize()
        .iter()
        .enumerate()
        .map(|(i, v)| v / s[i % cols])
        .collect();
    let awq_err = stats.relative_output_error(&w, &back).unwrap();
    assert!(awq_err < 0.8 * rtn_err, "AWQ {awq_err} vs RTN {rtn_err}");
    assert!(s[0] > s[100], "outlier channels get larger scales");
}

#[test]
fn smoothquant_lowers_w8a8_error_on_outlier_channels() {
    // A few input channels carry 50× larger activations: per-token int8 activations lose the
    // small channels unless SmoothQuant migrates the range into the weights.
    let (rows, cols, tokens) = (64, 128, 2000);
    let w = random(rows * cols, 6);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(10);
    let x: Vec<f32> = (0..tokens * cols)
        .map(|k| rng.gen_range(-1f32..1.0) * if k % cols < 3 { 50.0 } else { 1.0 })
        .collect();
    let xt = Tensor::from_vec(x, (tokens, cols), &Device::Cpu).unwrap();
    let mut stats = LinearStats::new(cols);
    stats.accumulate(&xt).unwrap();
    let wt = Tensor::from_vec(w.clone(), (rows, cols), &Device::Cpu).unwrap();
    let exact = xt.matmul(&wt.t().unwrap()).unwrap();
    let scheme = QuantScheme {
        bits: 8,
        grid: Grid::Symmetric,
        granularity: Granularity::Channel,
        search: false,
    };
    // Output error of int8 per-channel weights `w · s` on int8 per-token inputs `x / s`.
    let w8a8_error = |s: &[f32]| -> f32 {
        let st = Tensor::from_slice(s, (1, cols), &Device::Cpu).unwrap();
        let ws: Vec<f32> = wt
            .broadcast_mul(&st)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let q = rtn(&ws, rows, cols, &scheme, None, "t")
            .unwrap()
            .dequantize();
        let mut l = shrink_models::Linear::new(
            Tensor::from_vec(q, (rows, cols), &Device::Cpu).unwrap(),
            None,
        );
        l.set_act_quant(Some(shrink_models::ActQuant::Int8PerToken));
        let y = l.forward(&xt.broadcast_div(&st).unwrap()).unwrap();
        let e = (y - &exact).unwrap().sqr().unwrap().sum_all().unwrap();
        e.to_scalar::<f32>().unwrap()
    };
    let linear = shrink_models::Linear::new(wt.clone(), None);
    let scales = |alpha| smooth::smoothing_scales(&[&linear], &stats, alpha).unwrap();
    let (none, plain, smoothed) = (
        w8a8_error(&vec![1.0; cols]),
        w8a8_error(&scales(0.0)),
        w8a8_error(&scales(0.5)),
    );
    assert!(
        smoothed < 0.5 * none && smoothed < plain,
        "SmoothQuant {smoothed} vs unsmoothed {none} vs alpha 0 {plain}"
    );
}

#[test]
fn compressed_tensors_export_decodes_to_the_quantized_values() {
    // Decoded here by compressed-tensors' rules (int32 words, lowest bits first, offset
    // 2^(bits-1), value = q · scale), independently of shrink-io's reader; then through the reader.
    let (rows, cols) = (6, 64);
    let w = random(rows * cols, 12);
    for (bits, granularity) in [(4u8, Granularity::Group(32)), (8, Granularity::Channel)] {
        let scheme = QuantScheme {
            bits,
            grid: Grid::Symmetric,
            granularity,
            search: false,
        };
        let q = rtn(&w, rows, cols, &scheme, None, "t").unwrap();
        let want = q.dequantize();
        let mut weights = std::collections::BTreeMap::new();
        weights.insert("m.weight".to_string(), QuantizedWeight::Packed(q));
        let hf = compressed_tensors(&weights, None, vec!["head".into()]).unwrap();
        let packed = &hf.tensors["m.weight_packed"];
        let words: Vec<u32> = packed
            .data
            .chunks(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let scale = &hf.tensors["m.weight_scale"];
        let scales: Vec<f32> = scale
            .data
            .chunks(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect();
        let per_word = 32 / bits as usize;
        let per_row = cols / per_word;
        assert_eq!(packed.shape, vec![rows, per_row]);
        for r in 0..rows {
            for c in 0..cols {
                let word = words[r * per_row + c / per_word];
                let u = (word >> (bits as usize * (c % per_word))) & ((1 << bits) - 1);
                let qv = u as i32 - (1 << (bits - 1));
                let g = scales.len() / rows;
                let s = scales[r * g + c / (cols / g)];
                assert_eq!(qv as f32 * s, want[r * cols + c], "{bits} bits ({r}, {c})");
            }
        }
        assert_eq!(
            hf.quantization_config["config_groups"]["group_0"]["weights"]["num_bits"],
            bits
        );
        assert_eq!(
            hf.quantization_config["ignore"],
            serde_json::json!(["head"])
        );
    }
    // Asymmetric grids (float minima) and k-quant blocks are refused by name.
    let mut weights = std::collections::BTreeMap::new();
    weights.insert(
        "a.weight".to_string(),
        QuantizedWeight::Packed(rtn(&w, rows, cols, &QuantScheme::Q4_1, None, "a").unwrap()),
    );
    let e = compressed_tensors(&weights, None, vec![])
        .unwrap_err()
        .to_string();
    assert!(e.contains("a.weight") && e.contains("asymmetric"), "{e}");
}

#[test]
fn gptq_keeps_a_pruning_mask_when_asked() {
    let (rows, cols) = (16, 256);
    let mut w = random(rows * cols, 21);
    for (i, v) in w.iter_mut().enumerate() {
        if (i * 7 + i / 3) % 2 == 0 {
            *v = 0.0;
        }
    }
    let zeros: Vec<bool> = w.iter().map(|v| *v == 0.0).collect();
    let stats = correlated_stats(cols, 2000, 5);
    let masked = |deq: &[f32]| {
        deq.iter()
            .zip(&zeros)
            .filter(|(v, z)| **z && **v != 0.0)
            .count()
    };
    let keep = GptqConfig {
        keep_zeros: true,
        ..Default::default()
    };
    let q = gptq(&w, rows, cols, &stats, &QuantScheme::Q4_0, &keep, "t").unwrap();
    assert_eq!(masked(&q.dequantize()), 0);
    let k = gptq_blocks(
        &w,
        rows,
        cols,
        &stats,
        CodeBlocks::K(KQuant::Q6K),
        &keep,
        "t",
    )
    .unwrap();
    assert_eq!(masked(&k.dequantize().unwrap()), 0);
    // Without it the error feedback fills the holes.
    let plain = gptq(
        &w,
        rows,
        cols,
        &stats,
        &QuantScheme::Q4_0,
        &GptqConfig::default(),
        "t",
    )
    .unwrap();
    let filled = masked(&plain.dequantize());
    assert!(filled > rows * cols / 100, "{filled}");
    // Keeping the mask still compensates: better than rounding the pruned weights directly.
    let err = |d: &[f32]| stats.relative_output_error(&w, d).unwrap();
    let rtn_err = err(&rtn(&w, rows, cols, &QuantScheme::Q4_0, None, "t")
        .unwrap()
        .dequantize());
    assert!(
        err(&q.dequantize()) < rtn_err,
        "{} vs {rtn_err}",
        err(&q.dequantize())
    );
}

/// The streamed path (a model read block by block from its file, the GGUF written as each block
/// is quantized) writes the very bytes of the whole-model path, for every block-wise method, with
/// rounded embeddings and an untied head, from a GGUF and from a sharded safetensors folder, with
/// the calibration activations in memory or spilled to a scratch file.
#[test]
fn streamed_quantization_writes_the_bytes_of_the_whole_model_path() {
    use shrink_io::Export;
    use shrink_models::Transformer;
    let dir = tempfile::tempdir().unwrap();
    let shrink_io::testing::TinyStreamable {
        config: cfg,
        gguf,
        hf,
        windows,
    } = shrink_io::testing::tiny_streamable(5, dir.path()).unwrap();
    let plan = QuantPlan {
        default: QuantScheme::Q4_0.into(),
        rules: vec![Rule::new("layers.1.mlp.down_proj", QuantScheme::Q8_0)],
        fallbacks: vec![],
        activations: None,
    };
    let output = QuantizedOutput {
        export: Export::Gguf,
        plan: &plan,
        embeddings: Some(Ok(QuantScheme::Q8_0.into())),
    };
    for input in [&gguf, &hf] {
        let checkpoint = shrink_io::load(input).unwrap();
        for (method, windows) in [
            (Method::Rtn, None),
            (Method::Rtn, Some(&windows[..])),
            (Method::Gptq(GptqConfig::default()), Some(&windows[..])),
            (
                Method::Awq {
                    grid: 10,
                    gptq: None,
                },
                Some(&windows[..]),
            ),
            (
                Method::SignRound(crate::SignRoundConfig {
                    steps: 6,
                    ..Default::default()
                }),
                Some(&windows[..]),
            ),
        ] {
            let whole_path = dir.path().join("whole.gguf");
            let mut whole =
                Transformer::from_checkpoint(&cfg, checkpoint.load_finite().unwrap(), DType::F32)
                    .unwrap();
            let q = quantize_model(
                &mut whole,
                method,
                &plan,
                windows,
                2,
                &shrink_core::NoProgress,
            )
            .unwrap();
            let a = write_quantized(&checkpoint, &whole, &q, &output, &whole_path).unwrap();
            let streamed_path = dir.path().join("streamed.gguf");
            // Rounding alone streams every tensor in its stored type (the GGUF's f16 linears
            // beside f32 norms, the folder's bf16), as `shrink quantize` does.
            let mut streamed = match windows {
                None => {
                    let m = checkpoint.streamed_as_stored().unwrap();
                    let q = m.tensor("model.layers.0.self_attn.q_proj.weight").unwrap();
                    let norm = m.tensor("model.layers.0.input_layernorm.weight").unwrap();
                    let want = match input == &gguf {
                        true => (DType::F16, DType::F32),
                        false => (DType::BF16, DType::BF16),
                    };
                    assert_eq!((q.dtype(), norm.dtype()), want);
                    m
                }
                Some(_) => checkpoint.streamed(DType::F32).unwrap(),
            };
            // GPTQ, AWQ and SignRound keep their activations in a scratch file: the same bytes.
            let spill = matches!(
                method,
                Method::Gptq(_) | Method::Awq { .. } | Method::SignRound(_)
            )
            .then_some(dir.path());
            let keep = shrink_calib::Keep {
                spill,
                ..Default::default()
            };
            let (r, b) = quantize_streamed(
                &checkpoint,
                &mut streamed,
                method,
                &output,
                windows,
                2,
                &shrink_core::Alone,
                keep,
                &shrink_core::NoProgress,
                &streamed_path,
            )
            .unwrap();
            let (whole_bytes, streamed_bytes) = (
                std::fs::read(&whole_path).unwrap(),
                std::fs::read(&streamed_path).unwrap(),
            );
            assert!(
                whole_bytes == streamed_bytes,
                "{method:?} from {}",
                input.display()
            );
            let facts = |layers: &[LayerReport]| {
                layers
                    .iter()
                    .map(|l| (l.name.clone(), l.format.clone(), l.relative_output_error))
                    .collect::<Vec<_>>()
            };
            assert_eq!(a.types, b.types);
            assert_eq!(facts(&r.layers), facts(&q.layers));
            // What was written loads back, with the rounded head as Q8_0.
            let info = shrink_io::inspect(&streamed_path).unwrap();
            let head = info
                .tensors
                .iter()
                .find(|t| t.name == "output.weight")
                .unwrap();
            assert_eq!(head.dtype, "Q8_0");
        }
    }
}

#[test]
fn a_streamed_compressed_tensors_folder_holds_the_tensors_of_the_whole_model_path() {
    use shrink_io::{Checkpoint, Export};
    use shrink_models::{ModelConfig, Transformer};
    let mut cfg = ModelConfig::tiny_for_tests();
    cfg.intermediate_size = 64;
    cfg.tie_word_embeddings = false;
    let model = Transformer::random(&cfg, 6, &Device::Cpu).unwrap();
    let source = Checkpoint {
        path: "tiny".into(),
        format: shrink_io::Format::HfFolder,
        config: serde_json::to_value(&cfg).unwrap(),
        tensors: model.checkpoint_tensors().unwrap().into(),
        tokenizer: None,
        generation_config: None,
        side_files: Default::default(),
    };
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in-hf");
    shrink_io::save_hf(&source, &input, shrink_io::SaveDType::BF16).unwrap();
    let windows: Vec<Vec<u32>> = (0..4)
        .map(|s| (0..16).map(|i| ((i * 5 + s * 11) % 60) as u32).collect())
        .collect();
    let w4 = QuantScheme {
        bits: 4,
        grid: crate::Grid::Symmetric,
        granularity: Granularity::Group(32),
        search: false,
    };
    let plan = QuantPlan {
        default: w4.into(),
        rules: vec![Rule::new("down_proj", QuantScheme { bits: 8, ..w4 })],
        fallbacks: vec![],
        activations: None,
    };
    let w8a8 = QuantPlan {
        activations: Some(crate::Activations {
            quant: shrink_models::ActQuant::Int8PerToken,
            except: vec![],
        }),
        ..QuantPlan::uniform(QuantScheme {
            bits: 8,
            granularity: Granularity::Channel,
            ..w4
        })
    };
    let checkpoint = shrink_io::load(&input).unwrap();
    for (plan, method) in [
        (&plan, Method::Gptq(GptqConfig::default())),
        (&plan, Method::Rtn),
        (
            &w8a8,
            Method::SmoothQuant {
                alpha: 0.5,
                gptq: None,
            },
        ),
    ] {
        let output = QuantizedOutput {
            export: Export::Hf,
            plan,
            embeddings: None,
        };
        let windows = (method != Method::Rtn).then_some(&windows[..]);
        let whole_path = dir.path().join("whole");
        let mut whole =
            Transformer::from_checkpoint(&cfg, checkpoint.load_finite().unwrap(), DType::F32)
                .unwrap();
        let q = quantize_model(
            &mut whole,
            method,
            plan,
            windows,
            2,
            &shrink_core::NoProgress,
        )
        .unwrap();
        write_quantized(&checkpoint, &whole, &q, &output, &whole_path).unwrap();
        let streamed_path = dir.path().join("streamed");
        let mut streamed = checkpoint.streamed(DType::F32).unwrap();
        quantize_streamed(
            &checkpoint,
            &mut streamed,
            method,
            &output,
            windows,
            2,
            &shrink_core::Alone,
            Default::default(),
            &shrink_core::NoProgress,
            &streamed_path,
        )
        .unwrap();
        let read = |dir: &std::path::Path| {
            let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
            let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            let mut all: Vec<(String, String, Vec<usize>, Vec<u8>)> = st
                .tensors()
                .into_iter()
                .map(|(n, v)| {
                    (
                        n,
                        format!("{:?}", v.dtype()),
                        v.shape().to_vec(),
                        v.data().to_vec(),
                    )
                })
                .collect();
            all.sort();
            let config: serde_json::Value =
                serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
            (all, config)
        };
        let (a, b) = (read(&whole_path), read(&streamed_path));
        assert_eq!(a.0.len(), b.0.len(), "{method:?}");
        for (x, y) in a.0.iter().zip(&b.0) {
            assert!(x == y, "{method:?}: tensor {} differs", x.0);
        }
        assert_eq!(a.1, b.1, "{method:?}: config.json");
        // The folder loads back (shrink decompresses compressed-tensors modules when it opens one).
        shrink_io::load(&streamed_path).unwrap();
    }
}

#[test]
fn rounding_a_slice_of_rows_at_a_time_gives_the_bytes_of_the_whole() {
    let (rows, cols) = (7, 512);
    let w = random(rows * cols, 9);
    let t = candle_core::Tensor::from_vec(w.clone(), (rows, cols), &Device::Cpu).unwrap();
    for format in [
        Format::from(QuantScheme::Q4_0),
        Format::from(QuantScheme::Q8_0),
        Format::K(KQuant::Q4K),
        Format::K(KQuant::Q6K),
    ] {
        let whole = rtn_format(&w, rows, cols, &format, None, "e", false)
            .unwrap()
            .into_ggml_blocks()
            .unwrap();
        for chunk in [1, cols, 3 * cols + 5, rows * cols] {
            let sliced = crate::write::round_rows(&t, &format, "e", chunk).unwrap();
            assert!(sliced == whole, "{} in slices of {chunk}", format.label());
        }
        // From bf16, as a bf16 embedding is read: the values of its f32 widening.
        let bf16 = t.to_dtype(DType::BF16).unwrap();
        let widened: Vec<f32> = bf16
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let want = rtn_format(&widened, rows, cols, &format, None, "e", false)
            .unwrap()
            .into_ggml_blocks()
            .unwrap();
        assert!(crate::write::round_rows(&bf16, &format, "e", cols).unwrap() == want);
    }
}
