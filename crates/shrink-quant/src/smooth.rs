//! SmoothQuant (Xiao et al., 2023) for W8A8: activation outliers are migrated into the weights
//! with per-input-channel scales `s_j = max|X_j|^α / max_k |W_kj|^(1−α)` over the linears that
//! share the input, folded like AWQ's (norm weights, `up_proj` rows), so the float model is
//! unchanged while the inputs every linear sees become easier to quantize per token.

use crate::awq::{fold_scales, scaled_stats, weights_of};
use crate::Result;
use shrink_calib::{BlockStats, LinearStats};
use shrink_models::{DecoderBlock, Linear};
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

/// Smooths a decoder block in place; returns the statistics of the smoothed inputs.
pub(crate) fn apply(
    block: &mut DecoderBlock,
    stats: &BlockStats,
    alpha: f64,
) -> Result<BTreeMap<String, LinearStats>> {
    let names: Vec<String> = block.linears().iter().map(|(n, _)| n.to_string()).collect();
    let get = |i: usize| {
        stats.get(&names[i]).ok_or_else(|| {
            crate::QuantError::Scheme(format!("no calibration statistics for '{}'", names[i]))
        })
    };
    let (attn_stats, mlp_stats, down_stats) = (get(0)?, get(4)?, get(6)?);
    let attn = smoothing_scales(
        &[&block.q_proj, &block.k_proj, &block.v_proj],
        attn_stats,
        alpha,
    )?;
    let mlp = smoothing_scales(&[&block.gate_proj, &block.up_proj], mlp_stats, alpha)?;
    let down = smoothing_scales(&[&block.down_proj], down_stats, alpha)?;
    fold_scales(block, &attn, &mlp, &down)?;
    let mut out = BTreeMap::new();
    let attn_scaled = scaled_stats(attn_stats, &attn);
    let mlp_scaled = scaled_stats(mlp_stats, &mlp);
    for name in &names[..3] {
        out.insert(name.clone(), attn_scaled.clone());
    }
    out.insert(names[4].clone(), mlp_scaled.clone());
    out.insert(names[5].clone(), mlp_scaled);
    out.insert(names[6].clone(), scaled_stats(down_stats, &down));
    Ok(out)
}
