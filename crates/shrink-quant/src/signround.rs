//! SignRound (Cheng et al., 2023; Intel's AutoRound): the rounding of each weight is learned per
//! block by signed gradient descent on the block's output error over the calibration windows.
//!
//! Each linear's grids are fixed first, by the importance-weighted round-to-nearest of its format
//! (the scales and minima llama.cpp's imatrix quantizer chooses, in any block type: legacy,
//! k-quant, i-quant or a compressed-tensors grid). Every weight `w` then gets an offset `v ∈
//! [−½, ½]` in units of its group's grid step `s`, and its value is the code nearest `w + v·s` on
//! its fixed grid (on an affine grid exactly SignRound's `s·round(w/s + v)`; in the i-quants'
//! codebooks, the nearest codebook value, or the nearest grid point and signs of its eight
//! weights). Each step runs one batch of windows through the block with those values, takes the
//! mean squared difference from the unquantized block's output on the same inputs (the outputs
//! of the blocks already quantized, as GPTQ sees them), and moves every offset by `lr` against
//! the sign of its gradient (straight through the rounding), `lr` decaying linearly to zero. The
//! codes written are the ones the offsets choose on the saved grids: what was trained is what is
//! stored. The learned offsets are kept only if their output error, averaged over the
//! calibration batches, is below the starting codes'.
//!
//! With [`SignRoundConfig::gptq`] the start is GPTQ's file instead: its grids, and offsets that
//! move each weight from GPTQ's value (zero offsets are GPTQ's codes), so the learning refines
//! GPTQ's error-feedback choices with the block's output error, which GPTQ's per-linear
//! objective does not see.
//!
//! Unlike AutoRound, the clipping range is not learned: the grids keep the importance-weighted
//! scale search of the format's own quantizer.

use crate::grid::GroupParams;
use crate::kquant::{CodeBlocks, CodeGrid, GgmlTensor};
use crate::{
    Format, Granularity, QuantError, QuantScheme, QuantizedTensor, QuantizedWeight, Result,
};
use candle_core::{DType, Tensor, Var};
use rayon::prelude::*;
use shrink_calib::{BlockInputs, BlockStats};
use shrink_models::{Block, NoHook};
use std::collections::BTreeMap;

/// SignRound settings.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SignRoundConfig {
    /// Signed-gradient steps per block (AutoRound's `iters`), one calibration batch each, the
    /// batches taken in turn.
    pub steps: usize,
    /// How far the first step moves an offset, in grid steps (decaying linearly to zero over the
    /// steps); `None` is AutoRound's `1 / steps`.
    #[serde(default)]
    pub lr: Option<f64>,
    /// Weights that are exactly zero (a pruning mask) keep a zero offset, so they are stored as
    /// the grid value nearest zero (zero itself on symmetric grids), as GPTQ's `keep_zeros`.
    #[serde(default)]
    pub keep_zeros: bool,
    /// Start from GPTQ's codes (with these settings) instead of round-to-nearest's: the grids are
    /// GPTQ's, and each offset moves its weight from GPTQ's value rather than from the weight, so
    /// zero offsets are GPTQ's file and the learning refines it.
    #[serde(default)]
    pub gptq: Option<crate::GptqConfig>,
}

impl Default for SignRoundConfig {
    fn default() -> Self {
        Self {
            steps: 200,
            lr: None,
            keep_zeros: false,
            gptq: None,
        }
    }
}

/// One linear's fixed grids: the codes of any values on them, and the stored weight.
enum Grids {
    Scheme {
        scheme: QuantScheme,
        params: Vec<GroupParams>,
    },
    Blocks {
        kind: CodeBlocks,
        bytes: Vec<u8>,
        /// Per block, its groups' grids.
        grids: Vec<Vec<CodeGrid>>,
    },
}

/// A linear whose rounding is learned.
struct Rounded {
    name: String,
    w: Vec<f32>,
    rows: usize,
    cols: usize,
    grids: Grids,
    /// Each weight's grid step (what an offset of 1 moves it by).
    step: Vec<f32>,
    /// The per-column importance the i-quants' grid points are chosen with.
    importance: Vec<f32>,
    /// The values the offsets move from when not the weights (GPTQ's).
    base: Option<Vec<f32>>,
}

/// The index of the group holding weight (`r`, `c`) of a `cols`-wide matrix in `scheme`, in the
/// row-major order of its group parameters.
fn group_of(scheme: &QuantScheme, cols: usize, r: usize, c: usize) -> usize {
    match scheme.granularity {
        Granularity::Tensor => 0,
        Granularity::Channel => r,
        Granularity::Group(g) => r * (cols / g) + c / g,
    }
}

/// The typical distance between neighbouring values of one group's grid.
fn grid_step(grid: &CodeGrid) -> f32 {
    match *grid {
        CodeGrid::Affine(a) => a.a.abs(),
        // IQ4_NL's codebook spans −127…113 in 16 values.
        CodeGrid::Book(d) => 16.0 * d.abs(),
        // The grids' magnitudes: 8, 25, 43 (IQ2), 4, 12, … 62 (IQ3_XXS), 1, 3, … 15 (IQ3_S).
        CodeGrid::Octet(q, d) => {
            let spacing = match q {
                shrink_core::iquant::IQuant::IQ3XXS => 8.0,
                shrink_core::iquant::IQuant::IQ3S => 2.0,
                _ => 17.5,
            };
            spacing * d.abs()
        }
    }
}

impl Rounded {
    fn new(
        name: &str,
        w: Vec<f32>,
        rows: usize,
        cols: usize,
        format: Format,
        importance: Vec<f32>,
        start: Option<QuantizedWeight>,
    ) -> Result<Self> {
        let base = start.as_ref().map(|q| q.dequantize()).transpose()?;
        let (grids, step) = match format {
            Format::Scheme(scheme) => {
                crate::methods::check(&w, rows, cols, &scheme, name)?;
                let params = match &start {
                    Some(QuantizedWeight::Packed(q)) => q
                        .scales
                        .iter()
                        .enumerate()
                        .map(|(k, &d)| {
                            let min = q.mins.get(k).copied().unwrap_or(half::f16::ZERO);
                            GroupParams::from_stored(d, min)
                        })
                        .collect(),
                    _ => crate::methods::group_codes(&scheme, &w, rows, cols, Some(&importance)).0,
                };
                let step = (0..rows * cols)
                    .map(|i| {
                        params[group_of(&scheme, cols, i / cols, i % cols)]
                            .scale
                            .to_f32()
                            .abs()
                    })
                    .collect();
                (Grids::Scheme { scheme, params }, step)
            }
            Format::K(_) | Format::I(_) => {
                let kind = match format {
                    Format::K(k) => CodeBlocks::K(k),
                    Format::I(q) => CodeBlocks::I(q),
                    Format::Scheme(_) => unreachable!(),
                };
                let blocks = match start {
                    Some(QuantizedWeight::Blocks(b)) => b,
                    _ => {
                        GgmlTensor::quantize(&w, rows, cols, kind.ggml(), Some(&importance), name)?
                    }
                };
                let grids: Vec<Vec<CodeGrid>> = blocks
                    .bytes
                    .chunks(kind.block_bytes())
                    .map(|b| kind.grids(b))
                    .collect();
                let (len, group) = (kind.block_len(), kind.group());
                let per_row = cols / len;
                let step = (0..rows * cols)
                    .map(|i| {
                        let (r, c) = (i / cols, i % cols);
                        grid_step(&grids[r * per_row + c / len][(c % len) / group])
                    })
                    .collect();
                (
                    Grids::Blocks {
                        kind,
                        bytes: blocks.bytes,
                        grids,
                    },
                    step,
                )
            }
        };
        Ok(Self {
            name: name.to_string(),
            w,
            rows,
            cols,
            grids,
            step,
            importance,
            base,
        })
    }

    /// The values (and codes) of `base + v·step` on the fixed grids, the base being the weights
    /// (or GPTQ's values).
    fn round(&self, v: &[f32], values: &mut [f32], codes: &mut [u32]) {
        let cols = self.cols;
        let (w, step) = (self.base.as_ref().unwrap_or(&self.w), &self.step);
        let target = |r: usize, c: usize| {
            let i = r * cols + c;
            w[i] + v[i] * step[i]
        };
        match &self.grids {
            Grids::Scheme { scheme, params } => {
                let (grid, bits) = (scheme.grid, scheme.bits);
                values
                    .par_chunks_mut(cols)
                    .zip(codes.par_chunks_mut(cols))
                    .enumerate()
                    .for_each(|(r, (values, codes))| {
                        for c in 0..cols {
                            let p = &params[group_of(scheme, cols, r, c)];
                            let q = grid.code(bits, p, target(r, c));
                            codes[c] = q as u32;
                            values[c] = grid.value(bits, p, q);
                        }
                    });
            }
            Grids::Blocks { kind, grids, .. } => {
                let (len, group, unit) = (kind.block_len(), kind.group(), kind.code_len());
                let per_row = cols / len;
                let importance = &self.importance;
                values
                    .par_chunks_mut(cols)
                    .zip(codes.par_chunks_mut(cols / unit))
                    .enumerate()
                    .for_each(|(r, (values, codes))| {
                        let mut x = [0f32; crate::iquant::OCTET];
                        for c in (0..cols).step_by(unit) {
                            for (j, x) in x[..unit].iter_mut().enumerate() {
                                *x = target(r, c + j);
                            }
                            let grid = &grids[r * per_row + c / len][(c % len) / group];
                            codes[c / unit] = grid.nearest(
                                &x[..unit],
                                &importance[c..c + unit],
                                &mut values[c..c + unit],
                            );
                        }
                    });
            }
        }
    }

    /// The stored weight whose codes the offsets `v` choose.
    fn finish(self, v: &[f32]) -> QuantizedWeight {
        let n = self.rows * self.cols;
        let unit = match &self.grids {
            Grids::Blocks { kind, .. } => kind.code_len(),
            Grids::Scheme { .. } => 1,
        };
        let (mut values, mut codes) = (vec![0f32; n], vec![0u32; n / unit]);
        self.round(v, &mut values, &mut codes);
        match self.grids {
            Grids::Scheme { scheme, params } => {
                let codes: Vec<u8> = codes.iter().map(|&c| c as u8).collect();
                QuantizedWeight::Packed(QuantizedTensor::from_parts(
                    self.rows, self.cols, scheme, &codes, &params,
                ))
            }
            Grids::Blocks {
                kind, mut bytes, ..
            } => {
                let per_block = kind.block_len() / unit;
                for (block, codes) in bytes
                    .chunks_mut(kind.block_bytes())
                    .zip(codes.chunks(per_block))
                {
                    kind.write_codes(block, codes);
                }
                QuantizedWeight::Blocks(GgmlTensor {
                    dtype: kind.ggml(),
                    rows: self.rows,
                    cols: self.cols,
                    bytes,
                })
            }
        }
    }
}

/// The mean squared difference of `block`'s outputs on the batches of `inputs` from `targets`.
fn output_error(block: &Block, inputs: &BlockInputs, targets: &[Tensor]) -> Result<f64> {
    let mut sum = 0.0;
    for (k, target) in targets.iter().enumerate() {
        let x = inputs.xs.get(k)?.to_dtype(DType::F32)?;
        let y = block.forward(&x, inputs.ctx, None, &mut NoHook)?;
        sum += (y - target)?.sqr()?.mean_all()?.to_scalar::<f32>()? as f64;
    }
    Ok(sum / targets.len().max(1) as f64)
}

/// Learns the rounding of `formats`' linears of `block` (by full linear name, in the block's
/// order) on the calibration batches `inputs`, the grids fixed from each linear's input
/// statistics in `stats`; returns each linear's stored weight by linear name. The block itself is
/// left as it was.
pub fn learn(
    block: &Block,
    stats: &BlockStats,
    inputs: &BlockInputs,
    formats: &[(String, Format)],
    cfg: &SignRoundConfig,
) -> Result<BTreeMap<String, QuantizedWeight>> {
    if inputs.world.size() > 1 {
        return Err(QuantError::Scheme(
            "SignRound runs on one rank (its gradient steps are not split across ranks)".into(),
        ));
    }
    if cfg.steps == 0 {
        return Err(QuantError::Scheme(
            "SignRound needs at least one step".into(),
        ));
    }
    let mut linears = Vec::with_capacity(formats.len());
    for (name, format) in formats {
        let weight = block
            .linears()
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, l)| l.weight().clone())
            .ok_or_else(|| {
                QuantError::Model(shrink_models::ModelError::UnknownLinear(name.clone()))
            })?;
        let (rows, cols) = weight.dims2()?;
        let w = shrink_models::F32Values::of(&weight)?.to_vec();
        let st = stats.get(name).ok_or_else(|| {
            QuantError::Scheme(format!(
                "SignRound needs calibration statistics for '{name}'"
            ))
        })?;
        let importance: Vec<f32> = (0..cols).map(|i| st.hessian[i * cols + i] as f32).collect();
        let start = cfg
            .gptq
            .map(|g| {
                let g = crate::GptqConfig {
                    keep_zeros: cfg.keep_zeros,
                    ..g
                };
                crate::quantize_tensor(
                    &w,
                    rows,
                    cols,
                    crate::Method::Gptq(g),
                    Some(st),
                    *format,
                    name,
                    false,
                )
            })
            .transpose()?;
        linears.push(Rounded::new(
            name, w, rows, cols, *format, importance, start,
        )?);
    }
    // The unquantized block's outputs: what every step is measured against.
    if inputs.xs.is_empty() {
        return Err(QuantError::Scheme(
            "SignRound needs calibration batches on this rank".into(),
        ));
    }
    let mut targets = Vec::with_capacity(inputs.xs.len());
    for k in 0..inputs.xs.len() {
        let x = inputs.xs.get(k)?.to_dtype(DType::F32)?;
        targets.push(block.forward(&x, inputs.ctx, None, &mut NoHook)?);
    }
    // The block with its linears' weights as variables.
    let mut tracked = block.clone();
    let mut vars = Vec::with_capacity(linears.len());
    let mut offsets: Vec<Vec<f32>> = linears.iter().map(|l| vec![0f32; l.w.len()]).collect();
    let mut buffers: Vec<(Vec<f32>, Vec<u32>)> = linears
        .iter()
        .map(|l| (vec![0f32; l.w.len()], vec![0u32; l.w.len()]))
        .collect();
    let set = |linears: &[Rounded],
               offsets: &[Vec<f32>],
               buffers: &mut [(Vec<f32>, Vec<u32>)],
               vars: &[Var]|
     -> Result<()> {
        for ((l, v), ((values, codes), var)) in linears
            .iter()
            .zip(offsets)
            .zip(buffers.iter_mut().zip(vars))
        {
            l.round(v, values, codes);
            var.set(&Tensor::from_slice(values, (l.rows, l.cols), var.device())?)?;
        }
        Ok(())
    };
    for l in &linears {
        let var = Var::zeros((l.rows, l.cols), DType::F32, &candle_core::Device::Cpu)?;
        tracked
            .linear_mut(&l.name)
            .ok_or_else(|| {
                QuantError::Model(shrink_models::ModelError::UnknownLinear(l.name.clone()))
            })?
            .set_weight(var.as_tensor().clone())?;
        vars.push(var);
    }
    set(&linears, &offsets, &mut buffers, &vars)?;
    let nearest = output_error(&tracked, inputs, &targets)?;
    let lr = cfg.lr.unwrap_or(1.0 / cfg.steps as f64);
    for step in 0..cfg.steps {
        let k = step % targets.len();
        let x = inputs.xs.get(k)?.to_dtype(DType::F32)?;
        let y = tracked.forward(&x, inputs.ctx, None, &mut NoHook)?;
        let loss = (y - &targets[k])?.sqr()?.mean_all()?;
        let grads = loss.backward()?;
        let rate = (lr * (1.0 - step as f64 / cfg.steps as f64)) as f32;
        for ((l, v), var) in linears.iter().zip(&mut offsets).zip(&vars) {
            let frozen = |i: usize| cfg.keep_zeros && l.w[i] == 0.0;
            let g = grads
                .get(var.as_tensor())
                .ok_or_else(|| QuantError::Scheme(format!("no gradient reached '{}'", l.name)))?;
            let g: Vec<f32> = g.flatten_all()?.to_vec1()?;
            v.par_iter_mut()
                .zip(g.par_iter())
                .enumerate()
                .for_each(|(i, (v, &g))| {
                    // The step is positive: the offset's gradient has the weight's sign.
                    if g != 0.0 && !frozen(i) {
                        *v = (*v - rate * g.signum()).clamp(-0.5, 0.5);
                    }
                });
        }
        set(&linears, &offsets, &mut buffers, &vars)?;
    }
    let learned = output_error(&tracked, inputs, &targets)?;
    if learned.is_nan() || learned >= nearest {
        for v in &mut offsets {
            v.fill(0.0);
        }
    }
    Ok(linears
        .into_iter()
        .zip(offsets)
        .map(|(l, v)| (l.name.clone(), l.finish(&v)))
        .collect())
}

#[cfg(test)]
mod tests;
