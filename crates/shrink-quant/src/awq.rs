//! AWQ (Lin et al., 2023): per-input-channel scales from activation magnitudes. Scaling a
//! linear's input channels by `1/s` and its weight columns by `s` changes nothing in float, but
//! moves quantization precision to the channels that carry large activations. The exponent α in
//! `s = mean|x|^α` is grid-searched per group of linears to minimise their output error, measured
//! exactly from the calibration Hessian: Σ_rows δᵀ H δ. The scales are folded into what produces
//! the input — the norm before q/k/v and the MLP in pre-norm blocks, the rows of `up_proj` (SwiGLU's
//! down) or of `v_proj` (o, when each query head has its own value head) — so the float model is
//! unchanged. The groups come from the model ([`shrink_models::Block::scale_groups`]): a post-norm
//! encoder (BERT) has only `v → o`, since its norms also feed the residual stream; its other
//! linears are quantized with the scheme alone.

use crate::{rtn, QuantScheme, Result};
use shrink_calib::quadratic;
use shrink_calib::{BlockStats, LinearStats};
use shrink_models::{Block, Linear};
use std::collections::BTreeMap;

pub(crate) fn weights_of(linear: &Linear) -> Result<(Vec<f32>, usize)> {
    let (rows, _) = linear.weight().dims2()?;
    Ok((
        linear
            .weight()
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1()?,
        rows,
    ))
}

/// The scales (one per input channel) that minimise the summed output error of `linears` after
/// round-to-nearest, over α ∈ {0, 1/grid, …, (grid-1)/grid}. α = 0 (no scaling) is a candidate, so
/// the result is never worse than plain RTN on this objective.
pub fn search_scales(
    linears: &[&Linear],
    stats: &LinearStats,
    scheme: &QuantScheme,
    grid: usize,
    name: &str,
) -> Result<Vec<f32>> {
    let n = stats.in_features;
    let h = stats.hessian_tensor()?;
    let weights: Vec<(Vec<f32>, usize)> = linears
        .iter()
        .map(|l| weights_of(l))
        .collect::<Result<_>>()?;
    let mean_abs: Vec<f32> = stats
        .channel_abs
        .iter()
        .map(|&a| (a / stats.rows.max(1) as f64) as f32)
        .collect();
    let plain = QuantScheme {
        search: false,
        ..*scheme
    };
    let mut best: Option<(f64, Vec<f32>)> = None;
    for k in 0..grid.max(1) {
        let alpha = k as f32 / grid.max(1) as f32;
        let mut s: Vec<f32> = mean_abs
            .iter()
            .map(|&m| m.max(1e-8).powf(alpha).max(1e-4))
            .collect();
        let (lo, hi) = s
            .iter()
            .fold((f32::INFINITY, 0f32), |(lo, hi), &v| (lo.min(v), hi.max(v)));
        let norm = (lo * hi).sqrt();
        s.iter_mut().for_each(|v| *v /= norm);
        let mut err = 0.0;
        for (w, rows) in &weights {
            let scaled: Vec<f32> = w.iter().enumerate().map(|(i, v)| v * s[i % n]).collect();
            let q = rtn(&scaled, *rows, n, &plain, None, name)?.dequantize();
            let delta: Vec<f32> = w
                .iter()
                .zip(&q)
                .enumerate()
                .map(|(i, (v, qv))| v - qv / s[i % n])
                .collect();
            err += quadratic(&delta, n, &h)?;
        }
        if best.as_ref().is_none_or(|(e, _)| err < *e) {
            best = Some((err, s));
        }
    }
    Ok(best.map(|(_, s)| s).unwrap_or_else(|| vec![1.0; n]))
}

/// Statistics of inputs divided channel-wise by `s`.
fn scaled_stats(stats: &LinearStats, s: &[f32]) -> LinearStats {
    let n = stats.in_features;
    let mut out = stats.clone();
    for i in 0..n {
        for j in 0..n {
            out.hessian[i * n + j] /= s[i] as f64 * s[j] as f64;
        }
        out.channel_sq[i] /= (s[i] as f64).powi(2);
        out.channel_abs[i] /= s[i] as f64;
        out.channel_max[i] /= s[i] as f64;
    }
    out
}

/// Computes input scales with `scales` for each of the block's scale groups
/// ([`Block::scale_groups`]: q/k/v, gate/up and down in the Llama family; q/k/v, up and o in
/// GPT-2; o in BERT), folds them in, and returns the statistics of the scaled inputs of the
/// linears they feed. `scales` gets the group's linears, their shared input's statistics and
/// their names.
pub(crate) fn rescale_block(
    block: &mut Block,
    stats: &BlockStats,
    scales: impl Fn(&[&Linear], &LinearStats, &[&str]) -> Result<Vec<f32>>,
) -> Result<BTreeMap<String, LinearStats>> {
    let mut found = vec![];
    for group in block.scale_groups() {
        let names: Vec<&str> = group
            .consumers
            .iter()
            .filter_map(|&r| block.name(r))
            .collect();
        let name = names.first().copied().unwrap_or_default();
        let st = stats.get(name).ok_or_else(|| {
            crate::QuantError::Scheme(format!("no calibration statistics for '{name}'"))
        })?;
        let linears: Vec<&Linear> = group
            .consumers
            .iter()
            .filter_map(|&r| block.linear(r))
            .collect();
        let s = scales(&linears, st, &names)?;
        found.push((group, scaled_stats(st, &s), s));
    }
    let mut out = BTreeMap::new();
    for (group, scaled, s) in found {
        block.fold_input_scale(&group, &s)?;
        for &role in &group.consumers {
            if let Some(name) = block.name(role) {
                out.insert(name.to_string(), scaled.clone());
            }
        }
    }
    Ok(out)
}

/// Searches and folds AWQ scales into `block`; returns the statistics of the scaled inputs of the
/// linears whose inputs changed, for the quantization that follows.
pub(crate) fn apply(
    block: &mut Block,
    stats: &BlockStats,
    scheme: &QuantScheme,
    grid: usize,
) -> Result<BTreeMap<String, LinearStats>> {
    rescale_block(block, stats, |linears, st, names| {
        search_scales(
            linears,
            st,
            scheme,
            grid,
            names.first().copied().unwrap_or_default(),
        )
    })
}
