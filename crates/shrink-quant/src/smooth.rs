//! SmoothQuant (Xiao et al., 2023) for W8A8: activation outliers are migrated into the weights
//! with per-input-channel scales `s_j = max|X_j|^α / max_k |W_kj|^(1−α)` over the linears that
//! share the input, folded like AWQ's (norm weights, `up_proj` rows), so the float model is
//! unchanged while the inputs every linear sees become easier to quantize per token. Only inputs
//! that are quantized are smoothed: where every linear sharing an input keeps it in 16 bits
//! (`activations_except`), migrating its outliers would only make those weights harder to round.

use crate::awq::{rescale_block, weights_of};
use crate::{Activations, Result};
use shrink_calib::{BlockStats, LinearStats};
use shrink_models::{Block, Linear};
use std::collections::BTreeMap;

/// SmoothQuant's scales for `linears` sharing one input with statistics `stats`.
pub fn smoothing_scales(linears: &[&Linear], stats: &LinearStats, alpha: f64) -> Result<Vec<f32>> {
    let n = stats.in_features;
    let mut w_max = vec![0f64; n];
    for l in linears {
        let (w, _) = weights_of(l)?;
        for (i, v) in w.iter().enumerate() {
            let m = &mut w_max[i % n];
            *m = m.max(v.abs() as f64);
        }
    }
    Ok((0..n)
        .map(|j| {
            let (a, w) = (stats.channel_max[j], w_max[j]);
            if a <= 0.0 || w <= 0.0 {
                1.0
            } else {
                (a.powf(alpha) / w.powf(1.0 - alpha)).clamp(1e-5, 1e5) as f32
            }
        })
        .collect())
}

/// Smooths a decoder block in place, each input whose linears' inputs `activations` quantizes
/// (every input without it); returns the statistics of the smoothed inputs.
pub(crate) fn apply(
    block: &mut Block,
    stats: &BlockStats,
    alpha: f64,
    activations: Option<&Activations>,
) -> Result<BTreeMap<String, LinearStats>> {
    rescale_block(block, stats, |linears, st, names| {
        let quantized = |a: &Activations| names.iter().any(|n| a.for_linear(n).is_some());
        if activations.is_some_and(|a| !quantized(a)) {
            return Ok(vec![1.0; st.in_features]);
        }
        smoothing_scales(linears, st, alpha)
    })
}

#[cfg(test)]
mod tests {
    use crate::*;
    use candle_core::Device;

    /// SmoothQuant smooths only inputs that are quantized: with `down_proj`'s inputs kept in 16 bits,
    /// its weights are rounded as they are (up_proj's rows unscaled), while q/k/v's input is smoothed.
    #[test]
    fn smoothquant_smooths_only_the_inputs_it_quantizes() {
        use shrink_models::{ActQuant, ModelConfig, Transformer};
        let mut cfg = ModelConfig::tiny_for_tests();
        cfg.intermediate_size = 64;
        let original = Transformer::random(&cfg, 4, &Device::Cpu).unwrap();
        let windows: Vec<Vec<u32>> = (0..4)
            .map(|s| (0..16).map(|i| ((i * 5 + s * 11) % 64) as u32).collect())
            .collect();
        let w8 = QuantScheme {
            bits: 8,
            grid: crate::Grid::Symmetric,
            granularity: Granularity::Channel,
            search: false,
        };
        let plain = |name: &str| -> Vec<f32> {
            let t = &original.named_tensors()[name];
            let (rows, cols) = t.dims2().unwrap();
            let w: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            rtn(&w, rows, cols, &w8, None, name).unwrap().dequantize()
        };
        for except in [vec![], vec!["down_proj".to_string()]] {
            let plan = QuantPlan {
                activations: Some(crate::Activations {
                    quant: ActQuant::Int8PerToken,
                    except: except.clone(),
                }),
                ..QuantPlan::uniform(w8)
            };
            let mut model = original.clone();
            let method = Method::SmoothQuant {
                alpha: 0.5,
                gptq: None,
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
            let stored = |name: &str| q.tensors[name].dequantize().unwrap();
            let down = "model.layers.0.mlp.down_proj.weight";
            let q_proj = "model.layers.0.self_attn.q_proj.weight";
            assert_eq!(
                stored(down) == plain(down),
                !except.is_empty(),
                "{except:?}"
            );
            assert_ne!(stored(q_proj), plain(q_proj), "{except:?}");
        }
    }
}
