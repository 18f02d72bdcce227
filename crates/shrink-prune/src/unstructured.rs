//! Unstructured and N:M pruning of one weight matrix (`rows × cols`, row-major, one row per output).
//!
//! - **Magnitude** removes the smallest |w| (per layer, or per N:M group).
//! - **Wanda** (Sun et al., 2023) removes the smallest |w_ij|·‖X_j‖₂ within each output row.
//! - **SparseGPT** (Frantar & Alistarh, 2023) walks the columns in blocks of 128: in each block it
//!   chooses the mask adaptively from w²/[(H⁻¹)_jj]² on the weights updated so far, then removes
//!   the masked weights one column at a time, spreading each removal's error over the columns not
//!   yet visited with the upper Cholesky factor of the inverse Hessian (the OBS update). Rows are
//!   independent given the mask, so each block's updates run row-parallel.

use crate::{PruneError, Result};
use rayon::prelude::*;
use shrink_calib::LinearStats;

/// How many weights to remove.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Sparsity {
    /// This fraction of the weights, in `[0, 1)`.
    Fraction(f64),
    /// At most `n` non-zeros in every group of `m` consecutive weights of a row (2:4, 4:8).
    NM { n: usize, m: usize },
}

impl Sparsity {
    /// `0.5`, `50%` or `2:4`.
    pub fn parse(text: &str) -> Result<Self> {
        let bad = || {
            PruneError::Config(format!(
                "sparsity '{text}': expected a fraction in [0, 1), a percentage or N:M such as 2:4"
            ))
        };
        let s = text.trim();
        if let Some((n, m)) = s.split_once(':') {
            let n: usize = n.trim().parse().map_err(|_| bad())?;
            let m: usize = m.trim().parse().map_err(|_| bad())?;
            return Sparsity::NM { n, m }.validated().map_err(|_| bad());
        }
        let value = match s.strip_suffix('%') {
            Some(p) => p.trim().parse::<f64>().map_err(|_| bad())? / 100.0,
            None => s.parse::<f64>().map_err(|_| bad())?,
        };
        Sparsity::Fraction(value).validated().map_err(|_| bad())
    }

    /// Checks the range: a fraction in `[0, 1)`, `0 < n < m`.
    pub fn validated(self) -> Result<Self> {
        match self {
            Sparsity::Fraction(f) if (0.0..1.0).contains(&f) => Ok(self),
            Sparsity::NM { n, m } if n > 0 && n < m && m <= 64 => Ok(self),
            other => Err(PruneError::Config(format!(
                "sparsity {other}: expected a fraction in [0, 1) or N:M with 0 < N < M ≤ 64"
            ))),
        }
    }

    /// The fraction of weights removed.
    pub fn fraction(self) -> f64 {
        match self {
            Sparsity::Fraction(f) => f,
            Sparsity::NM { n, m } => (m - n) as f64 / m as f64,
        }
    }

    /// Checks the range, and that rows of `cols` weights split into N:M groups.
    pub(crate) fn check(self, cols: usize, name: &str) -> Result<()> {
        self.validated()?;
        if let Sparsity::NM { m, .. } = self {
            if !cols.is_multiple_of(m) {
                return Err(PruneError::Shape {
                    tensor: name.to_string(),
                    message: format!("rows of {cols} weights do not split into groups of {m}"),
                });
            }
        }
        Ok(())
    }
}

impl std::fmt::Display for Sparsity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Sparsity::Fraction(x) => write!(f, "{:.4}", x),
            Sparsity::NM { n, m } => write!(f, "{n}:{m}"),
        }
    }
}

/// SparseGPT settings.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SparseGptConfig {
    /// Dampening added to the Hessian diagonal, as a fraction of its mean.
    pub damp: f64,
    /// Columns per adaptive mask selection.
    pub block_size: usize,
}

impl Default for SparseGptConfig {
    fn default() -> Self {
        Self {
            damp: 0.01,
            block_size: 128,
        }
    }
}

/// Number of weights to remove among the first `upto` of `total` candidates, so that the count
/// over consecutive ranges adds up to exactly `round(fraction · total)`.
fn cumulative(fraction: f64, upto: usize) -> usize {
    (fraction * upto as f64).round() as usize
}

/// Indices (into `scores`) of the `k` smallest scores; ties go to the lower index.
fn smallest(scores: &[f64], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    if k == 0 {
        return vec![];
    }
    let cmp = |a: &usize, b: &usize| scores[*a].total_cmp(&scores[*b]).then(a.cmp(b));
    if k < idx.len() {
        idx.select_nth_unstable_by(k - 1, cmp);
        idx.truncate(k);
    }
    idx
}

/// The weights to remove from row `r` of a matrix, given the row's scores: for a fraction, the
/// row's share of the smallest (shares spread so that the matrix loses exactly
/// `round(fraction · rows · cols)`); for N:M, the `m − n` smallest in every group of `m`.
fn row_removals(scores: &[f64], r: usize, sparsity: Sparsity) -> Vec<usize> {
    let cols = scores.len();
    match sparsity {
        Sparsity::NM { n, m } => scores
            .chunks(m)
            .enumerate()
            .flat_map(|(g, sg)| smallest(sg, m - n).into_iter().map(move |i| g * m + i))
            .collect(),
        Sparsity::Fraction(f) => smallest(
            scores,
            cumulative(f, (r + 1) * cols) - cumulative(f, r * cols),
        ),
    }
}

/// Zeroes, row by row in parallel, the weights [`row_removals`] picks by `score(column, weight)`:
/// one row's scores in memory per thread, never a score for every weight of the matrix.
fn prune_rows(
    w: &mut [f32],
    cols: usize,
    sparsity: Sparsity,
    score: impl Fn(usize, f32) -> f64 + Sync,
) {
    w.par_chunks_mut(cols).enumerate().for_each(|(r, row)| {
        let scores: Vec<f64> = row.iter().enumerate().map(|(c, &v)| score(c, v)).collect();
        for i in row_removals(&scores, r, sparsity) {
            row[i] = 0.0;
        }
    });
}

/// Magnitude pruning: removes the smallest |w| over the layer (or in each N:M group), in place.
/// Over the layer, the `k`-th smallest |w| is found on a copy of the magnitudes (4 bytes a
/// weight) and every smaller weight is removed, then the ties at it in index order: the `k`
/// smallest by (|w|, index).
pub fn magnitude(
    w: &mut [f32],
    rows: usize,
    cols: usize,
    sparsity: Sparsity,
    name: &str,
) -> Result<()> {
    shrink_core::check_matrix(w, rows, cols, name)?;
    sparsity.check(cols, name)?;
    match sparsity {
        Sparsity::Fraction(f) => {
            let k = cumulative(f, rows * cols);
            if k == 0 {
                return Ok(());
            }
            let mut magnitudes: Vec<f32> = w.iter().map(|v| v.abs()).collect();
            let (_, &mut t, _) = magnitudes.select_nth_unstable_by(k - 1, f32::total_cmp);
            drop(magnitudes);
            let mut ties = k - w.iter().filter(|v| v.abs() < t).count();
            for v in w.iter_mut() {
                let a = v.abs();
                if a < t {
                    *v = 0.0;
                } else if a == t && ties > 0 {
                    *v = 0.0;
                    ties -= 1;
                }
            }
        }
        nm => prune_rows(w, cols, nm, |_, v| v.abs() as f64),
    }
    Ok(())
}

/// Wanda: removes the smallest |w_ij|·‖X_j‖₂ within each output row (or N:M group), in place.
pub fn wanda(
    w: &mut [f32],
    rows: usize,
    cols: usize,
    stats: &LinearStats,
    sparsity: Sparsity,
    name: &str,
) -> Result<()> {
    shrink_core::check_matrix(w, rows, cols, name)?;
    sparsity.check(cols, name)?;
    check_stats(stats, cols, name)?;
    let norms: Vec<f64> = stats.channel_sq.iter().map(|v| v.sqrt()).collect();
    prune_rows(w, cols, sparsity, |c, v| v.abs() as f64 * norms[c]);
    Ok(())
}

fn check_stats(stats: &LinearStats, cols: usize, name: &str) -> Result<()> {
    if stats.in_features != cols {
        return Err(PruneError::Shape {
            tensor: name.to_string(),
            message: format!(
                "calibration statistics have {} input channels, the weight {cols}",
                stats.in_features
            ),
        });
    }
    Ok(())
}

/// SparseGPT, in place: removes weights block by block with adaptive masks and OBS updates of the
/// remaining weights.
pub fn sparsegpt(
    w: &mut [f32],
    rows: usize,
    cols: usize,
    stats: &LinearStats,
    sparsity: Sparsity,
    cfg: &SparseGptConfig,
    name: &str,
) -> Result<()> {
    shrink_core::check_matrix(w, rows, cols, name)?;
    sparsity.check(cols, name)?;
    check_stats(stats, cols, name)?;
    let n = cols;
    let mut bs = cfg.block_size.max(1);
    if let Sparsity::NM { m, .. } = sparsity {
        bs = bs.div_ceil(m) * m; // N:M groups never straddle two blocks
    }
    let u = shrink_calib::damped_inverse_cholesky_upper(stats.hessian.clone(), n, cfg.damp, name)?;
    let mut x: Vec<f64> = w.iter().map(|&v| v as f64).collect();
    let mut start = 0;
    while start < n {
        let end = (start + bs).min(n);
        let width = end - start;
        // OBS saliency of removing each weight of the block on the weights updated so far.
        let scores: Vec<f64> = (0..rows * width)
            .into_par_iter()
            .map(|i| {
                let (r, c) = (i / width, start + i % width);
                let d = u[c * n + c];
                x[r * n + c] * x[r * n + c] / (d * d)
            })
            .collect();
        let mask = match sparsity {
            Sparsity::Fraction(f) => {
                // Exactly round(f · rows · cols) over the layer, spread over the blocks.
                let k = cumulative(f, rows * end) - cumulative(f, rows * start);
                let mut mask = vec![false; rows * width];
                for i in smallest(&scores, k) {
                    mask[i] = true;
                }
                mask
            }
            nm => {
                let mut mask = vec![false; rows * width];
                mask.par_chunks_mut(width)
                    .zip(scores.par_chunks(width))
                    .for_each(|(mr, sr)| {
                        for i in row_removals(sr, 0, nm) {
                            mr[i] = true;
                        }
                    });
                mask
            }
        };
        x.par_chunks_mut(n)
            .zip(mask.par_chunks(width))
            .for_each(|(row, mrow)| {
                for (j, &removed) in mrow.iter().enumerate() {
                    if !removed {
                        continue;
                    }
                    let c = start + j;
                    let err = row[c] / u[c * n + c];
                    row[c] = 0.0;
                    shrink_calib::subtract_scaled(
                        &mut row[c + 1..],
                        err,
                        &u[c * n + c + 1..(c + 1) * n],
                    );
                }
                // Removed weights stay exactly zero (later updates never reach back).
            });
        start = end;
    }
    for (dst, &v) in w.iter_mut().zip(&x) {
        *dst = v as f32;
    }
    Ok(())
}
