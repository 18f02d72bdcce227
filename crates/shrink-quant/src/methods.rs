//! Round-to-nearest and GPTQ on one weight matrix.
//!
//! GPTQ (Frantar et al., 2022) quantizes columns in order and spreads each column's rounding error
//! over the columns not yet quantized, using the upper Cholesky factor `U` of the inverse Hessian.
//! Rows are independent given `U`, so each row runs the whole recurrence on its own, in parallel
//! tiles of rows that share each row of `U` while it is in cache; that is the CPU-friendly form of
//! the same computation (no lazy batch update needed).

use crate::grid::{Grid, GroupParams};
use crate::kquant::{CodeBlocks, CodeGrid, GgmlTensor};
use crate::{Granularity, QuantError, QuantScheme, QuantizedTensor, Result};
use rayon::prelude::*;
use shrink_calib::LinearStats;

/// GPTQ settings.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GptqConfig {
    /// Dampening added to the Hessian diagonal, as a fraction of its mean.
    pub damp: f64,
    /// Quantize columns in order of decreasing Hessian diagonal ("act-order").
    pub act_order: bool,
    /// Fix every group's scale from the original weights before the error feedback starts (always
    /// the case with act-order, so that groups stay contiguous runs of the original columns).
    pub static_groups: bool,
    /// Weights that are exactly zero (a pruning mask) are stored as the grid value nearest zero
    /// (zero itself on symmetric grids) instead of absorbing the error of earlier columns: GPTQ
    /// on a pruned model keeps its sparsity, as SparseGPT's joint sparsify-and-quantize pass does.
    #[serde(default)]
    pub keep_zeros: bool,
    /// Fraction `b` of the Hessian's off-diagonal taken out before GPTQ: H' = (1 − b)·H +
    /// b·diag(H). 0 is GPTQ; 1 keeps only the diagonal (llama.cpp's importance weighting, each
    /// column's error no longer fed to the others); between them the error feedback trusts the
    /// calibration text's input correlations less.
    #[serde(default)]
    pub blend: f64,
}

impl Default for GptqConfig {
    fn default() -> Self {
        Self {
            damp: 0.01,
            act_order: true,
            static_groups: true,
            keep_zeros: false,
            blend: 0.0,
        }
    }
}

/// Parameters of every group from the given values (and importance per column), and the codes
/// of every weight on its group's grid, row-major.
pub(crate) fn group_codes(
    scheme: &QuantScheme,
    w: &[f32],
    rows: usize,
    cols: usize,
    importance: Option<&[f32]>,
) -> (Vec<GroupParams>, Vec<u8>) {
    let mut codes = vec![0u8; rows * cols];
    let (grid, bits, search) = (scheme.grid, scheme.bits, scheme.search);
    let params = match scheme.granularity {
        Granularity::Tensor => {
            let imp: Option<Vec<f32>> =
                importance.map(|i| (0..rows).flat_map(|_| i.iter().copied()).collect());
            vec![grid.quantize_group(bits, w, imp.as_deref(), search, &mut codes)]
        }
        Granularity::Channel => w
            .par_chunks(cols)
            .zip(codes.par_chunks_mut(cols))
            .map(|(row, codes)| grid.quantize_group(bits, row, importance, search, codes))
            .collect(),
        Granularity::Group(g) => {
            // Written in place, a row's groups at a time (no list of pieces to join).
            let mut params =
                vec![GroupParams::from_stored(half::f16::ZERO, half::f16::ZERO); rows * (cols / g)];
            w.par_chunks(cols)
                .zip(codes.par_chunks_mut(cols))
                .zip(params.par_chunks_mut(cols / g))
                .for_each(|((row, codes), params)| {
                    let groups = row.chunks(g).zip(codes.chunks_mut(g));
                    for (k, ((group, codes), p)) in groups.zip(params).enumerate() {
                        let imp = importance.map(|i| &i[k * g..(k + 1) * g]);
                        *p = grid.quantize_group(bits, group, imp, search, codes);
                    }
                });
            params
        }
    };
    (params, codes)
}

pub(crate) fn check(
    w: &[f32],
    rows: usize,
    cols: usize,
    scheme: &QuantScheme,
    name: &str,
) -> Result<()> {
    shrink_core::check_matrix(w, rows, cols, name)?;
    scheme.validate(cols).map_err(|e| QuantError::Shape {
        tensor: name.to_string(),
        message: e.to_string(),
    })
}

/// Round-to-nearest: every weight to the nearest grid value of its group. `importance` (one
/// weight per input column, e.g. activation energy) steers the clip search when the scheme has one.
pub fn rtn(
    w: &[f32],
    rows: usize,
    cols: usize,
    scheme: &QuantScheme,
    importance: Option<&[f32]>,
    name: &str,
) -> Result<QuantizedTensor> {
    check(w, rows, cols, scheme, name)?;
    let (params, codes) = group_codes(scheme, w, rows, cols, importance);
    Ok(QuantizedTensor::from_parts(
        rows, cols, *scheme, &codes, &params,
    ))
}

/// [`rtn`] of a scheme that is a legacy ggml block type (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) written
/// straight into its blocks: the bytes of `rtn(…).to_ggml_blocks()`, without the codes and the
/// packed stream between (what a GGUF written without calibration needs).
pub fn rtn_blocks(
    w: &[f32],
    rows: usize,
    cols: usize,
    scheme: &QuantScheme,
    importance: Option<&[f32]>,
    name: &str,
) -> Result<GgmlTensor> {
    check(w, rows, cols, scheme, name)?;
    let dtype = scheme.ggml_type().ok_or_else(|| QuantError::Shape {
        tensor: name.to_string(),
        message: format!("{scheme:?} is not a ggml block type"),
    })?;
    let (grid, bits, size, per_row) = (scheme.grid, scheme.bits, dtype.type_size(), cols / 32);
    let mut bytes = vec![0u8; rows * per_row * size];
    bytes
        .par_chunks_mut(size)
        .zip(w.par_chunks(32))
        .enumerate()
        .with_min_len(256)
        .for_each(|(g, (out, group))| {
            let k = g % per_row;
            let imp = importance.map(|i| &i[k * 32..(k + 1) * 32]);
            let mut codes = [0u8; 32];
            let p = grid.quantize_group(bits, group, imp, scheme.search, &mut codes);
            crate::tensor::encode_block(dtype, &codes, p.scale, p.min, out);
        });
    Ok(GgmlTensor {
        dtype,
        rows,
        cols,
        bytes,
    })
}

/// GPTQ with the input statistics of the layer.
/// What GPTQ needs before quantizing rows: the weights with dead inputs zeroed, the column order
/// (with act-order, runs of `unit` columns that share a code keep together and in order), the upper
/// Cholesky factor of the (permuted, damped) inverse Hessian, and per-column importance.
struct Prepared {
    w: Vec<f32>,
    perm: Vec<usize>,
    u: Vec<f64>,
    importance: Vec<f32>,
}

fn prepare(
    w: &[f32],
    rows: usize,
    cols: usize,
    stats: &LinearStats,
    cfg: &GptqConfig,
    unit: usize,
    name: &str,
) -> Result<Prepared> {
    if stats.in_features != cols {
        return Err(QuantError::Shape {
            tensor: name.to_string(),
            message: format!(
                "statistics for {} inputs, weight has {cols}",
                stats.in_features
            ),
        });
    }
    let n = cols;
    let diag: Vec<f64> = (0..n).map(|i| stats.hessian[i * n + i]).collect();
    let importance: Vec<f32> = diag.iter().map(|&d| d as f32).collect();
    // Inputs that were always zero carry no information: their weights are zero for GPTQ.
    let mut w = w.to_vec();
    for (c, &d) in diag.iter().enumerate() {
        if d == 0.0 {
            (0..rows).for_each(|r| w[r * n + c] = 0.0);
        }
    }
    let mut perm: Vec<usize> = (0..n).collect();
    if cfg.act_order {
        let mut units: Vec<usize> = (0..n / unit).collect();
        let weight = |u: usize| diag[u * unit..(u + 1) * unit].iter().sum::<f64>();
        units.sort_by(|&a, &b| weight(b).total_cmp(&weight(a)).then(a.cmp(&b)));
        perm = units
            .iter()
            .flat_map(|&u| u * unit..(u + 1) * unit)
            .collect();
    }
    let keep = 1.0 - cfg.blend;
    let hp: Vec<f64> = (0..n * n)
        .map(|k| {
            let h = stats.hessian[perm[k / n] * n + perm[k % n]];
            match k / n == k % n || cfg.blend == 0.0 {
                true => h,
                false => keep * h,
            }
        })
        .collect();
    let u = shrink_calib::damped_inverse_cholesky_upper(hp, n, cfg.damp, name)?;
    Ok(Prepared {
        w,
        perm,
        u,
        importance,
    })
}

/// Rows of a tile of GPTQ: they share each row of `u` while it is in cache (rows are
/// independent; per row the arithmetic is unchanged, so the bits do not depend on the tile).
const TILE_ROWS: usize = 8;

/// GPTQ on a tile of rows (`tile` holds whole rows of `perm.len()` columns): per row, columns in
/// `perm` order, each quantized by `quantize(row_in_tile, i, x[i..])` (which returns the
/// dequantized value it chose), its error spread over the remaining columns by `u`.
fn error_feedback_rows(
    tile: &[f32],
    perm: &[usize],
    u: &[f64],
    mut quantize: impl FnMut(usize, usize, &[f64]) -> f64,
) {
    let n = perm.len();
    let mut xs: Vec<Vec<f64>> = tile
        .chunks(n)
        .map(|row| perm.iter().map(|&c| row[c] as f64).collect())
        .collect();
    for i in 0..n {
        let uii = u[i * n + i];
        let urow = &u[i * n + i + 1..(i + 1) * n];
        for (t, x) in xs.iter_mut().enumerate() {
            let err = (x[i] - quantize(t, i, &x[i..])) / uii;
            shrink_calib::subtract_scaled(&mut x[i + 1..], err, urow);
        }
    }
}

pub fn gptq(
    w: &[f32],
    rows: usize,
    cols: usize,
    stats: &LinearStats,
    scheme: &QuantScheme,
    cfg: &GptqConfig,
    name: &str,
) -> Result<QuantizedTensor> {
    check(w, rows, cols, scheme, name)?;
    let Prepared {
        w,
        perm,
        u,
        importance,
    } = prepare(w, rows, cols, stats, cfg, 1, name)?;
    let n = cols;
    let fixed =
        cfg.static_groups || cfg.act_order || !matches!(scheme.granularity, Granularity::Group(_));
    // ggml's asymmetric blocks (Q4_1, Q5_1) get the grids llama.cpp's importance-weighted
    // quantizer would search (`make_qkx3_quants`); the stored scheme is unchanged.
    let searched = QuantScheme {
        search: scheme.search || (scheme.grid == Grid::Asymmetric && scheme.ggml_type().is_some()),
        ..*scheme
    };
    let static_params = fixed.then(|| group_codes(&searched, &w, rows, cols, Some(&importance)).0);
    let group_size = match scheme.granularity {
        Granularity::Group(g) => g,
        _ => n,
    };
    let (grid, bits) = (scheme.grid, scheme.bits);
    let rows_out: Vec<(Vec<u8>, Vec<GroupParams>)> = w
        .par_chunks(n * TILE_ROWS)
        .enumerate()
        .flat_map_iter(|(t, tile)| {
            // Per row of the tile: its codes and (without fixed groups) its groups' parameters.
            let mut out: Vec<(Vec<u8>, Vec<GroupParams>)> =
                tile.chunks(n).map(|_| (vec![0u8; n], Vec::new())).collect();
            error_feedback_rows(tile, &perm, &u, |k, i, x| {
                let (r, row) = (t * TILE_ROWS + k, &tile[k * n..(k + 1) * n]);
                let (codes, dynamic) = &mut out[k];
                let orig = perm[i];
                let params = match &static_params {
                    Some(p) => p[scheme.group_of(n, r, orig)],
                    None => {
                        // No act-order: perm is the identity and groups start here.
                        if orig.is_multiple_of(group_size) {
                            let values: Vec<f32> =
                                x[..group_size].iter().map(|&v| v as f32).collect();
                            let mut scratch = vec![0u8; group_size];
                            dynamic.push(grid.quantize_group(
                                bits,
                                &values,
                                Some(&importance[i..i + group_size]),
                                searched.search,
                                &mut scratch,
                            ));
                        }
                        dynamic[orig / group_size]
                    }
                };
                let target = if cfg.keep_zeros && row[orig] == 0.0 {
                    0.0
                } else {
                    x[0] as f32
                };
                let q = grid.code(bits, &params, target);
                codes[orig] = q;
                grid.value(bits, &params, q) as f64
            });
            out
        })
        .collect();
    let mut codes = Vec::with_capacity(rows * n);
    let mut params = static_params.unwrap_or_default();
    for (row_codes, row_params) in rows_out {
        codes.extend(row_codes);
        params.extend(row_params);
    }
    debug_assert_eq!(params.len(), scheme.groups(rows, cols));
    Ok(QuantizedTensor::from_parts(
        rows, cols, *scheme, &codes, &params,
    ))
}

/// GPTQ into k-quant or i-quant blocks. Each block's scales (and minima) come from ggml's
/// importance-weighted quantizer (on the original weights with act-order or static groups,
/// otherwise on the error-updated weights when GPTQ reaches the block); GPTQ then chooses every
/// code inside those fixed grids, and the codes are written into the blocks as chosen.
///
/// Where a code stands for eight weights (grid points and signs: IQ3_S, IQ3_XXS, IQ2_S, IQ2_XS,
/// IQ2_XXS), GPTQ chooses
/// it when it reaches the first of them, as the best code for their error-updated values with
/// each weight's error weighted by 1/[H⁻¹]ᵢᵢ (its cost in the layer objective, as GPTQ's own
/// error scaling), and feeds back each of the eight errors in turn (as GPTVQ does). Act-order
/// orders these types' runs of eight weights by their summed importance, never splitting one.
pub fn gptq_blocks(
    w: &[f32],
    rows: usize,
    cols: usize,
    stats: &LinearStats,
    k: CodeBlocks,
    cfg: &GptqConfig,
    name: &str,
) -> Result<GgmlTensor> {
    crate::kquant::check(w, rows, cols, k.ggml(), name)?;
    let unit = k.code_len();
    let Prepared {
        w,
        perm,
        u,
        importance,
    } = prepare(w, rows, cols, stats, cfg, unit, name)?;
    let n = cols;
    let block_len = k.block_len();
    let blocks_per_row = n / block_len;
    let bb = k.block_bytes();
    let fixed = cfg.static_groups || cfg.act_order;
    let static_blocks = if fixed {
        Some(GgmlTensor::quantize(&w, rows, cols, k.ggml(), Some(&importance), name)?.bytes)
    } else {
        None
    };
    // Each weight's cost per squared error in the layer objective, 1/[H⁻¹]ᵢᵢ = 1/uᵢᵢ².
    let cost: Vec<f32> = (0..n)
        .map(|i| (1.0 / (u[i * n + i].powi(2))) as f32)
        .collect();
    /// One row's blocks (scales and minima first, codes written at the end), their grids, codes,
    /// the values of the code being fed back, and the first failure of ggml's quantizer.
    struct RowBlocks {
        bytes: Vec<u8>,
        grids: Vec<Vec<CodeGrid>>,
        codes: Vec<u32>,
        values: Vec<f32>,
        failure: Option<QuantError>,
    }
    let rows_out: Vec<Result<Vec<u8>>> = w
        .par_chunks(n * TILE_ROWS)
        .enumerate()
        .flat_map_iter(|(t, tile)| {
            let mut out: Vec<RowBlocks> = (0..tile.len() / n)
                .map(|k_row| {
                    let r = t * TILE_ROWS + k_row;
                    let bytes = match &static_blocks {
                        Some(b) => {
                            b[r * blocks_per_row * bb..(r + 1) * blocks_per_row * bb].to_vec()
                        }
                        None => vec![0u8; blocks_per_row * bb],
                    };
                    RowBlocks {
                        grids: bytes.chunks(bb).map(|b| k.grids(b)).collect(),
                        bytes,
                        codes: vec![0u32; n / unit],
                        values: vec![0f32; unit],
                        failure: None,
                    }
                })
                .collect();
            let cost = &cost;
            error_feedback_rows(tile, &perm, &u, |k_row, i, x| {
                let row = &tile[k_row * n..(k_row + 1) * n];
                let blocks = &mut out[k_row];
                let orig = perm[i];
                let sb = orig / block_len;
                if static_blocks.is_none() && orig.is_multiple_of(block_len) {
                    // No act-order: perm is the identity and the super-block starts here.
                    let values: Vec<f32> = x[..block_len].iter().map(|&v| v as f32).collect();
                    match GgmlTensor::quantize(
                        &values,
                        1,
                        block_len,
                        k.ggml(),
                        Some(&importance[i..i + block_len]),
                        name,
                    ) {
                        Ok(block) => {
                            blocks.grids[sb] = k.grids(&block.bytes);
                            blocks.bytes[sb * bb..(sb + 1) * bb].copy_from_slice(&block.bytes);
                        }
                        Err(e) => blocks.failure = Some(e),
                    }
                }
                if orig.is_multiple_of(unit) {
                    // A code's first weight (with codes of one weight: every weight).
                    let mut target = [0f32; crate::iquant::OCTET];
                    for (j, t) in target[..unit].iter_mut().enumerate() {
                        if !(cfg.keep_zeros && row[orig + j] == 0.0) {
                            *t = x[j] as f32;
                        }
                    }
                    let grid = &blocks.grids[sb][(orig % block_len) / k.group()];
                    blocks.codes[orig / unit] =
                        grid.nearest(&target[..unit], &cost[i..i + unit], &mut blocks.values);
                }
                blocks.values[orig % unit] as f64
            });
            out.into_iter().map(move |mut blocks| {
                if let Some(e) = blocks.failure {
                    return Err(e);
                }
                let per_block = block_len / unit;
                for (sb, block) in blocks.bytes.chunks_mut(bb).enumerate() {
                    k.write_codes(block, &blocks.codes[sb * per_block..(sb + 1) * per_block]);
                }
                Ok(blocks.bytes)
            })
        })
        .collect();
    let mut bytes = Vec::with_capacity(rows * blocks_per_row * bb);
    for row in rows_out {
        bytes.extend(row?);
    }
    Ok(GgmlTensor {
        dtype: k.ggml(),
        rows,
        cols,
        bytes,
    })
}

#[cfg(test)]
mod asymmetric_tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Weights that lie on a Q4_1 grid (the demo model's own format) come back exactly from GPTQ
    /// into Q5_1, whose grid holds Q4_1's at half the scale: the searched grids find it, where
    /// the plain min/max grid (scale (max − min)/31) cannot.
    #[test]
    fn gptq_into_q5_1_keeps_q4_1_weights_exactly() {
        let (rows, cols) = (4, 128);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let mut w = vec![0f32; rows * cols];
        for group in w.chunks_mut(32) {
            let d = half::f16::from_f32(rng.gen_range(0.001..0.01)).to_f32();
            let m = half::f16::from_f32(rng.gen_range(-0.1..-0.01)).to_f32();
            for (j, v) in group.iter_mut().enumerate() {
                // Both ends of the range in every group, as Q4_1's quantizer leaves them.
                let q = match j {
                    0 => 0,
                    1 => 15,
                    _ => rng.gen_range(0..16),
                };
                *v = q as f32 * d + m;
            }
        }
        let stats = crate::tests::correlated_stats(cols, 300, 7);
        for act_order in [false, true] {
            let cfg = GptqConfig {
                act_order,
                ..Default::default()
            };
            let q = gptq(&w, rows, cols, &stats, &QuantScheme::Q5_1, &cfg, "t").unwrap();
            assert_eq!(q.dequantize(), w, "act-order {act_order}");
            assert_eq!(q.scheme, QuantScheme::Q5_1);
        }
        let mut codes = vec![0u8; 32];
        let plain = Grid::Asymmetric.quantize_group(5, &w[..32], None, false, &mut codes);
        let back: Vec<f32> = codes
            .iter()
            .map(|&c| Grid::Asymmetric.value(5, &plain, c))
            .collect();
        assert_ne!(back, w[..32], "min/max alone is not exact");
    }
}

#[cfg(test)]
mod blend_tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// `blend` is GPTQ on H' = (1 − b)·H + b·diag(H), built here by hand: the same codes.
    #[test]
    fn blend_is_gptq_on_the_hand_blended_hessian() {
        let (rows, cols) = (6, 64);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let w: Vec<f32> = (0..rows * cols).map(|_| rng.gen_range(-0.1..0.1)).collect();
        // Correlated inputs: each a mix of a shared signal and its own noise.
        let x: Vec<Vec<f64>> = (0..200)
            .map(|_| {
                let s: f64 = rng.gen_range(-1.0..1.0);
                (0..cols)
                    .map(|_| s + 0.3 * rng.gen_range(-1.0..1.0))
                    .collect()
            })
            .collect();
        let mut stats = LinearStats::new(cols);
        for row in &x {
            for i in 0..cols {
                for j in 0..cols {
                    stats.hessian[i * cols + j] += row[i] * row[j];
                }
            }
        }
        let gptq_on = |hessian: Vec<f64>, blend: f64| {
            let mut s = LinearStats::new(cols);
            s.hessian = hessian;
            let cfg = GptqConfig {
                blend,
                ..Default::default()
            };
            gptq(&w, rows, cols, &s, &QuantScheme::Q4_0, &cfg, "t").unwrap()
        };
        let by_hand = |b: f64| -> Vec<f64> {
            let h = &stats.hessian;
            (0..cols * cols)
                .map(|k| match k / cols == k % cols {
                    true => h[k],
                    false => (1.0 - b) * h[k],
                })
                .collect()
        };
        let plain = gptq_on(stats.hessian.clone(), 0.0);
        for b in [0.5, 1.0] {
            let blended = gptq_on(stats.hessian.clone(), b);
            assert_eq!(blended, gptq_on(by_hand(b), 0.0), "blend {b}");
            assert_ne!(blended, plain, "blend {b} changes the codes");
        }
        // Only the diagonal left: no error feedback, each weight rounded on its group's grid.
        let diagonal = gptq_on(stats.hessian.clone(), 1.0);
        let rtn = rtn(&w, rows, cols, &QuantScheme::Q4_0, None, "t").unwrap();
        assert_eq!(diagonal, rtn);
    }
}
