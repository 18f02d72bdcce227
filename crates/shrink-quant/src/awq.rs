//! AWQ (Lin et al., 2023): per-input-channel scales from activation magnitudes. Scaling a
//! linear's input channels by `1/s` and its weight columns by `s` changes nothing in float, but
//! moves quantization precision to the channels that carry large activations. The exponent α in
//! `s = mean|x|^α` is grid-searched per group of linears to minimise their output error, measured
//! exactly from the calibration Hessian: Σ_rows δᵀ H δ. The scales are folded into what produces
//! the input — the RMSNorm weight (q/k/v, gate/up) or the rows of `up_proj` (down) — so the float
//! model is unchanged. (`v → o` is not scaled: with grouped-query attention one v channel feeds
//! several o channels.)

use crate::{rtn, QuantScheme, Result};
use candle_core::Tensor;
use shrink_calib::quadratic;
use shrink_calib::{BlockStats, LinearStats};
use shrink_models::{DecoderBlock, Linear};
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

fn row<S: Into<candle_core::Shape>>(s: &[f32], shape: S) -> Result<Tensor> {
    Ok(Tensor::from_slice(s, shape, &candle_core::Device::Cpu)?)
}

fn scale_columns(linear: &mut Linear, s: &[f32]) -> Result<()> {
    let w = linear
        .weight()
        .broadcast_mul(&row(s, (1, s.len()))?.to_dtype(linear.weight().dtype())?)?;
    Ok(linear.set_weight(w)?)
}

/// Folds input scales into a block: q/k/v columns × `attn`, input norm ÷ `attn`; gate/up columns ×
/// `mlp`, post-attention norm ÷ `mlp`; down columns × `down`, up rows ÷ `down`. The block computes
/// the same function in float.
pub fn fold_scales(
    block: &mut DecoderBlock,
    attn: &[f32],
    mlp: &[f32],
    down: &[f32],
) -> Result<()> {
    let inv = |s: &[f32]| -> Vec<f32> { s.iter().map(|v| 1.0 / v).collect() };
    let norm = &mut block.input_layernorm;
    norm.weight = norm
        .weight
        .broadcast_mul(&row(&inv(attn), (attn.len(),))?.to_dtype(norm.weight.dtype())?)?;
    for l in [&mut block.q_proj, &mut block.k_proj, &mut block.v_proj] {
        scale_columns(l, attn)?;
    }
    let norm = &mut block.post_attention_layernorm;
    norm.weight = norm
        .weight
        .broadcast_mul(&row(&inv(mlp), (mlp.len(),))?.to_dtype(norm.weight.dtype())?)?;
    for l in [&mut block.gate_proj, &mut block.up_proj] {
        scale_columns(l, mlp)?;
    }
    scale_columns(&mut block.down_proj, down)?;
    let up = &mut block.up_proj;
    let w = up
        .weight()
        .broadcast_mul(&row(&inv(down), (down.len(), 1))?.to_dtype(up.weight().dtype())?)?;
    up.set_weight(w)?;
    Ok(())
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

/// Computes input scales for a block's three input groups (q/k/v, gate/up, down) with `scales`,
/// folds them in, and returns the statistics of the scaled inputs of the linears they feed.
pub(crate) fn rescale_block(
    block: &mut DecoderBlock,
    stats: &BlockStats,
    scales: impl Fn(&[&Linear], &LinearStats, &str) -> Result<Vec<f32>>,
) -> Result<BTreeMap<String, LinearStats>> {
    let names: Vec<String> = block.linears().iter().map(|(n, _)| n.to_string()).collect();
    let get = |i: usize| {
        stats.get(&names[i]).ok_or_else(|| {
            crate::QuantError::Scheme(format!("no calibration statistics for '{}'", names[i]))
        })
    };
    let (attn_stats, mlp_stats, down_stats) = (get(0)?, get(4)?, get(6)?);
    let attn = scales(
        &[&block.q_proj, &block.k_proj, &block.v_proj],
        attn_stats,
        &names[0],
    )?;
    let mlp = scales(&[&block.gate_proj, &block.up_proj], mlp_stats, &names[4])?;
    let down = scales(&[&block.down_proj], down_stats, &names[6])?;
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

/// Searches and folds AWQ scales into `block`; returns the statistics of the scaled inputs of the
/// linears whose inputs changed, for the quantization that follows.
pub(crate) fn apply(
    block: &mut DecoderBlock,
    stats: &BlockStats,
    scheme: &QuantScheme,
    grid: usize,
) -> Result<BTreeMap<String, LinearStats>> {
    rescale_block(block, stats, |linears, st, name| {
        search_scales(linears, st, scheme, grid, name)
    })
}
