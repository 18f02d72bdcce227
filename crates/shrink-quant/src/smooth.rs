//! SmoothQuant (Xiao et al., 2023) for W8A8: activation outliers are migrated into the weights
//! with per-input-channel scales `s_j = max|X_j|^α / max_k |W_kj|^(1−α)` over the linears that
//! share the input, folded like AWQ's (norm weights, `up_proj` rows), so the float model is
//! unchanged while the inputs every linear sees become easier to quantize per token.

use crate::awq::{rescale_block, weights_of};
use crate::Result;
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

/// Smooths a decoder block in place; returns the statistics of the smoothed inputs.
pub(crate) fn apply(
    block: &mut Block,
    stats: &BlockStats,
    alpha: f64,
) -> Result<BTreeMap<String, LinearStats>> {
    rescale_block(block, stats, |linears, st, _| {
        smoothing_scales(linears, st, alpha)
    })
}
