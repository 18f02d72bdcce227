use super::*;
use crate::{quantize_model, IQuant, KQuant, Method, QuantPlan};
use candle_core::Device;
use shrink_models::{ModelConfig, Transformer};

/// A model whose linears hold whole k- and i-quant blocks, and calibration windows.
fn model_and_windows() -> (Transformer, Vec<Vec<u32>>) {
    let mut cfg = ModelConfig::tiny_for_tests();
    cfg.hidden_size = 256;
    cfg.intermediate_size = 256;
    cfg.num_hidden_layers = 2;
    let model = Transformer::random(&cfg, 11, &Device::Cpu).unwrap();
    let windows = (0..8)
        .map(|s| {
            (0..24)
                .map(|i| ((i * 7 + s * 13 + i * i) % 64) as u32)
                .collect()
        })
        .collect();
    (model, windows)
}

fn quantized(
    model: &Transformer,
    windows: &[Vec<u32>],
    method: Method,
    format: Format,
) -> (Transformer, crate::QuantizedModel) {
    let mut q = model.clone();
    let out = quantize_model(
        &mut q,
        method,
        &QuantPlan::uniform(format),
        Some(windows),
        2,
        &shrink_core::NoProgress,
    )
    .unwrap();
    (q, out)
}

/// Mean squared difference of the logits from the unquantized model's on the windows.
fn logit_error(reference: &Transformer, q: &Transformer, windows: &[Vec<u32>]) -> f64 {
    let ids = Tensor::new(windows.to_vec(), &Device::Cpu).unwrap();
    let a = reference.forward(&ids).unwrap();
    let b = q.forward(&ids).unwrap();
    (a - b)
        .unwrap()
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64
}

fn formats() -> [Format; 5] {
    [
        QuantScheme::Q4_0.into(),
        Format::K(KQuant::Q3K),
        Format::K(KQuant::Q2K),
        Format::I(IQuant::IQ4NL),
        Format::I(IQuant::IQ3XXS),
    ]
}

/// With a zero learning rate the offsets stay zero: the codes are the importance-weighted
/// round-to-nearest's, byte for byte, where the format's quantizer rounds to its stored grid (the
/// uniform grids, the k-quants). The i-quants' quantizers choose codes under the unrounded scale;
/// on the stored one the nearest codes are never worse in the importance-weighted error.
#[test]
fn no_steps_taken_is_importance_weighted_rtn() {
    let (model, windows) = model_and_windows();
    let frozen = Method::SignRound(SignRoundConfig {
        steps: 2,
        lr: Some(0.0),
        ..Default::default()
    });
    for format in formats() {
        let (_, a) = quantized(&model, &windows, frozen, format);
        let (_, b) = quantized(&model, &windows, Method::Rtn, format);
        if !matches!(format, Format::I(_)) {
            assert_eq!(a.tensors, b.tensors, "{format:?}");
            continue;
        }
        // The first block's linears: the same inputs, so the same importance.
        let stats = shrink_calib::block_stats(
            &model.blocks[0],
            &[model
                .embed(&Tensor::new(windows.clone(), &Device::Cpu).unwrap())
                .unwrap()],
            &model.attention_context(24, 0).unwrap(),
            true,
        )
        .unwrap();
        for (name, t) in a.tensors.iter().filter(|(n, _)| n.contains("layers.0.")) {
            let linear = name.trim_end_matches(".weight");
            let st = stats.get(linear).unwrap();
            let w: Vec<f32> = model.named_tensors()[name]
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let cols = st.hessian.len().isqrt();
            let err = |q: &QuantizedWeight| -> f64 {
                q.dequantize()
                    .unwrap()
                    .iter()
                    .zip(&w)
                    .enumerate()
                    .map(|(i, (a, b))| {
                        st.hessian[(i % cols) * (cols + 1)] * ((a - b) as f64).powi(2)
                    })
                    .sum()
            };
            let (mine, theirs) = (err(t), err(&b.tensors[name]));
            assert!(
                mine <= theirs * (1.0 + 1e-6),
                "{format:?} {name}: {mine} vs {theirs}"
            );
        }
    }
}

/// Learned offsets lower the model's output error below importance-weighted RTN in every kind of
/// block (a uniform grid, affine k-quant groups, the IQ4_NL codebook, IQ3_XXS codes of eight
/// weights: two grid points of four and the signs), keep each block's scales (the grids are fixed), and run to the same bytes twice.
#[test]
fn learned_rounding_beats_rtn_on_fixed_grids_in_every_block_type() {
    let (model, windows) = model_and_windows();
    let cfg = SignRoundConfig {
        steps: 40,
        ..Default::default()
    };
    for format in formats() {
        let (q_rtn, rtn) = quantized(&model, &windows, Method::Rtn, format);
        let (q_sr, sr) = quantized(&model, &windows, Method::SignRound(cfg), format);
        let (e_rtn, e_sr) = (
            logit_error(&model, &q_rtn, &windows),
            logit_error(&model, &q_sr, &windows),
        );
        assert!(
            e_sr < 0.5 * e_rtn,
            "{format:?}: SignRound {e_sr} vs RTN {e_rtn}"
        );
        assert_ne!(sr.tensors, rtn.tensors);
        // The first block's grids (later blocks see other inputs after other first blocks).
        for (name, t) in sr.tensors.iter().filter(|(n, _)| n.contains("layers.0.")) {
            let r = &rtn.tensors[name];
            assert_eq!(t.size_bytes(), r.size_bytes(), "{name}");
            match (t, r) {
                (QuantizedWeight::Packed(a), QuantizedWeight::Packed(b)) => {
                    assert_eq!(a.scales, b.scales, "{name}: the grids are fixed");
                }
                (QuantizedWeight::Blocks(a), QuantizedWeight::Blocks(b)) => {
                    let kind = match format {
                        Format::K(k) => CodeBlocks::K(k),
                        Format::I(q) => CodeBlocks::I(q),
                        Format::Scheme(_) => unreachable!(),
                    };
                    let bb = kind.block_bytes();
                    for (x, y) in a.bytes.chunks(bb).zip(b.bytes.chunks(bb)) {
                        assert_eq!(kind.grids(x), kind.grids(y), "{name}: the grids are fixed");
                    }
                }
                _ => panic!("{name}: different storage"),
            }
        }
        let (_, again) = quantized(&model, &windows, Method::SignRound(cfg), format);
        assert_eq!(again.tensors, sr.tensors, "{format:?} is deterministic");
    }
}

#[test]
fn signround_without_steps_or_calibration_is_refused() {
    let (model, windows) = model_and_windows();
    let none = Method::SignRound(SignRoundConfig {
        steps: 0,
        ..Default::default()
    });
    let plan = QuantPlan::uniform(QuantScheme::Q4_0);
    for w in [Some(windows.as_slice()), None] {
        let e = quantize_model(
            &mut model.clone(),
            none,
            &plan,
            w,
            2,
            &shrink_core::NoProgress,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("SignRound"), "{e}");
    }
}

/// With `keep_zeros`, a pruned model's zeros stay zero (Q4_0 holds zero exactly); without, large
/// learned offsets move some of them.
#[test]
fn keep_zeros_keeps_a_pruning_mask() {
    let (mut model, windows) = model_and_windows();
    for block in &mut model.blocks {
        for linear in block.linears_mut() {
            let w = linear.weight();
            let (rows, cols) = w.dims2().unwrap();
            let mut v: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
            for (i, x) in v.iter_mut().enumerate() {
                if (i * 7) % 3 == 0 {
                    *x = 0.0;
                }
            }
            linear
                .set_weight(Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap())
                .unwrap();
        }
    }
    let zeros_kept = |keep_zeros: bool| -> bool {
        // Steps of a tenth of a grid step: offsets reach ±½, where a zero rounds away.
        let cfg = SignRoundConfig {
            steps: 40,
            lr: Some(0.1),
            keep_zeros,
            gptq: None,
        };
        let (_, q) = quantized(
            &model,
            &windows,
            Method::SignRound(cfg),
            QuantScheme::Q4_0.into(),
        );
        q.tensors.iter().all(|(name, t)| {
            let w: Vec<f32> = model.named_tensors()[name]
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let d = t.dequantize().unwrap();
            w.iter().zip(&d).all(|(a, b)| *a != 0.0 || *b == 0.0)
        })
    };
    assert!(zeros_kept(true));
    assert!(!zeros_kept(false));
}

/// Started from GPTQ's codes, zero offsets write GPTQ's file byte for byte, and learning lowers
/// the output error below GPTQ's.
#[test]
fn started_from_gptq_it_refines_gptq() {
    let (model, windows) = model_and_windows();
    let gptq = crate::GptqConfig::default();
    for format in [QuantScheme::Q4_0.into(), Format::K(KQuant::Q2K)] {
        let frozen = SignRoundConfig {
            steps: 2,
            lr: Some(0.0),
            gptq: Some(gptq),
            ..Default::default()
        };
        let (_, a) = quantized(&model, &windows, Method::SignRound(frozen), format);
        let (q_gptq, b) = quantized(&model, &windows, Method::Gptq(gptq), format);
        assert_eq!(a.tensors, b.tensors, "{format:?}");
        let learning = SignRoundConfig {
            steps: 40,
            gptq: Some(gptq),
            ..Default::default()
        };
        let (q_sr, _) = quantized(&model, &windows, Method::SignRound(learning), format);
        let (e_gptq, e_sr) = (
            logit_error(&model, &q_gptq, &windows),
            logit_error(&model, &q_sr, &windows),
        );
        assert!(e_sr < 0.95 * e_gptq, "{format:?}: {e_sr} vs GPTQ {e_gptq}");
    }
}
