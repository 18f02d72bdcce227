//! Dense symmetric positive-definite routines on the Hessians (up to the MLP width, 14,336 on an
//! 8B Llama). Row-major `n × n` f64 matrices. The loops are memory-bound at these sizes, so each
//! routine works on tiles of rows or columns that share every load; within a tile every entry
//! still sums its terms one at a time in ascending order, so the bits are those of the textbook
//! loops (unit tests compare them bit for bit) whatever the tile, thread count or SIMD width.

use crate::{CalibError, Result};
use rayon::prelude::*;
use shrink_core::multiversion;

/// Columns per panel of the Cholesky factorization and per tile of the triangular inverse.
const TILE: usize = 16;

/// Lower Cholesky factor `L` with `A = L Lᵀ`; `Err(column, pivot)` if `A` is not positive definite.
///
/// Entry `L[i][j] = (A[i][j] - Σ_{k<j} L[i][k] L[j][k]) / L[j][j]`, the sum taken in order of `k`.
/// Columns are done in panels of [`TILE`]: the part of each sum over the columns before the panel
/// is accumulated for all of the panel's columns in one pass over row `i` (the panel's rows,
/// transposed, stay in cache), then continued over the panel's own columns.
pub fn cholesky_lower(a: &[f64], n: usize) -> std::result::Result<Vec<f64>, (usize, f64)> {
    let mut l = vec![0.0; n * n];
    let mut panel_t = Vec::new();
    for j0 in (0..n).step_by(TILE) {
        let p = TILE.min(n - j0);
        // The panel's rows over the columns before it, transposed: panel_t[k][jj] = L[j0+jj][k].
        panel_t.clear();
        panel_t.resize(j0 * TILE, 0.0);
        for jj in 0..p {
            for (k, &v) in l[(j0 + jj) * n..(j0 + jj) * n + j0].iter().enumerate() {
                panel_t[k * TILE + jj] = v;
            }
        }
        // The panel's own triangle, one column after another.
        let mut diag = [0.0f64; TILE];
        let (_, rest) = l.split_at_mut(j0 * n);
        let (panel, below) = rest.split_at_mut(p * n);
        let mut acc_rows: Vec<[f64; TILE]> = panel
            .chunks(n)
            .map(|row| lane_sums(&row[..j0], &panel_t))
            .collect();
        for jj in 0..p {
            let j = j0 + jj;
            let mut s = acc_rows[jj][jj];
            for k in j0..j {
                let v = panel[jj * n + k];
                s += v * v;
            }
            let d = a[j * n + j] - s;
            if d <= 0.0 || !d.is_finite() {
                return Err((j, d));
            }
            let d = d.sqrt();
            diag[jj] = d;
            panel[jj * n + j] = d;
            for ii in jj + 1..p {
                let i = j0 + ii;
                let mut s = acc_rows[ii][jj];
                for k in j0..j {
                    s += panel[ii * n + k] * panel[jj * n + k];
                }
                panel[ii * n + j] = (a[i * n + j] - s) / d;
            }
        }
        acc_rows.clear();
        let panel: &[f64] = panel;
        let panel_t = &panel_t;
        below.par_chunks_mut(n).enumerate().for_each(|(off, row)| {
            let i = j0 + p + off;
            let acc = lane_sums(&row[..j0], panel_t);
            for jj in 0..p {
                let j = j0 + jj;
                let mut s = acc[jj];
                for k in j0..j {
                    s += row[k] * panel[jj * n + k];
                }
                row[j] = (a[i * n + j] - s) / diag[jj];
            }
        });
    }
    Ok(l)
}

/// The inverse of a lower-triangular matrix, column panels of [`TILE`] stored one after another,
/// each from its first column's row down, row by row: `L⁻¹[k][c]` for `c` in panel `p` (columns
/// `c0 = p·TILE ..`) and `k ≥ c0` is `data[offset(p) + (k - c0)·TILE + (c - c0)]`. Half the memory
/// of the square matrix, and the layout [`inverse_product`] streams.
struct LowerPanels {
    n: usize,
    data: Vec<f64>,
}

impl LowerPanels {
    fn offset(&self, panel: usize) -> usize {
        // Σ_{q < panel} (n - q·TILE)·TILE: earlier panels' rows of TILE values each.
        TILE * (panel * self.n - TILE * panel * panel.saturating_sub(1) / 2)
    }

    /// Panel `p` from row `k = p·TILE` on.
    fn panel(&self, p: usize) -> &[f64] {
        let start = self.offset(p);
        &self.data[start..start + (self.n - p * TILE) * TILE]
    }

    /// The square row-major matrix (for tests).
    #[cfg(test)]
    fn to_square(&self) -> Vec<f64> {
        let n = self.n;
        let mut m = vec![0.0; n * n];
        for p in 0..n.div_ceil(TILE) {
            let c0 = p * TILE;
            for (k, lanes) in self.panel(p).chunks(TILE).enumerate() {
                for (cc, &v) in lanes.iter().enumerate().take(n - c0) {
                    m[(c0 + k) * n + c0 + cc] = v;
                }
            }
        }
        m
    }
}

/// Inverse of a lower-triangular matrix.
///
/// Column `c` of the inverse solves `L x = e_c`: `x[c] = 1 / L[c][c]` and
/// `x[i] = -(Σ_{c≤k<i} L[i][k] x[k]) / L[i][i]`. Columns are solved [`TILE`] at a time (a
/// panel), so each row of `L` is read once per panel; a column's lane adds exact zeros for
/// `k < c`, which leaves its sum's bits unchanged.
fn invert_lower(l: &[f64], n: usize) -> LowerPanels {
    let sizes: Vec<usize> = (0..n.div_ceil(TILE))
        .map(|p| (n - p * TILE) * TILE)
        .collect();
    let mut data = vec![0.0; sizes.iter().sum()];
    let mut panels = Vec::with_capacity(sizes.len());
    let mut rest = data.as_mut_slice();
    for &size in &sizes {
        let (panel, tail) = rest.split_at_mut(size);
        panels.push(panel);
        rest = tail;
    }
    panels.into_par_iter().enumerate().for_each(|(p, x)| {
        let c0 = p * TILE;
        let cs = TILE.min(n - c0);
        for i in c0..n {
            let (solved, xi) = x.split_at_mut((i - c0) * TILE);
            let s = lane_sums(&l[i * n + c0..i * n + i], solved);
            let lii = l[i * n + i];
            for cc in 0..cs {
                let c = c0 + cc;
                xi[cc] = match i.cmp(&c) {
                    std::cmp::Ordering::Less => 0.0,
                    std::cmp::Ordering::Equal => 1.0 / lii,
                    std::cmp::Ordering::Greater => -s[cc] / lii,
                };
            }
        }
    });
    LowerPanels { n, data }
}

multiversion! {
    /// `s[cc] = Σ_k row[k] · cols[k][cc]` in order of `k`, one lane per `cc`, lanes starting at
    /// `-0.0` as `Iterator::sum` does; `cols` holds [`TILE`] values per `k`.
    fn lane_sums(row: &[f64], cols: &[f64]) -> [f64; TILE] => lane_sums_impl
}

#[inline(always)]
fn lane_sums_impl(row: &[f64], cols: &[f64]) -> [f64; TILE] {
    let mut acc = [-0.0f64; TILE];
    for (&x, c) in row.iter().zip(cols.chunks_exact(TILE)) {
        for (a, &cv) in acc.iter_mut().zip(c) {
            *a += x * cv;
        }
    }
    acc
}

/// Transposes a square row-major matrix in place.
fn transpose_in_place(a: &mut [f64], n: usize) {
    for i in 0..n {
        for j in i + 1..n {
            a.swap(i * n + j, j * n + i);
        }
    }
}

/// `L⁻ᵀ L⁻¹` from `L⁻¹` (lower triangular): entry (i, j) = Σ_k L⁻¹[k][i] L⁻¹[k][j] over
/// k ≥ i, in order of k; only the lower triangle j ≤ i is filled, as the Cholesky factorization
/// reads only that.
fn inverse_product(linv: &LowerPanels) -> Vec<f64> {
    // Tiles of TILE rows × PC columns sum in registers over k, streaming two panels. Terms with
    // k < i are exact zeros (L⁻¹ is lower triangular) and leave the sums' bits alone.
    let n = linv.n;
    let mut hinv = vec![0.0; n * n];
    hinv.par_chunks_mut(n * TILE)
        .enumerate()
        .for_each(|(p, rows)| {
            let i0 = p * TILE;
            let a = linv.panel(p);
            for j0 in (0..i0 + rows.len() / n).step_by(PC) {
                let (q, lane) = (j0 / TILE, j0 % TILE);
                // Panel q's rows from k = i0 on.
                let b = &linv.panel(q)[(i0 - q * TILE) * TILE..];
                let acc = product_tile(a, b, lane);
                for (rr, row) in rows.chunks_mut(n).enumerate() {
                    let last = (i0 + rr + 1).min(j0 + PC).min(n);
                    if last > j0 {
                        row[j0..last].copy_from_slice(&acc[rr][..last - j0]);
                    }
                }
            }
        });
    hinv
}

/// Columns of a tile of [`inverse_product`]; a divisor of [`TILE`].
const PC: usize = 8;

/// `acc[rr][cc] = Σ_k a[k][rr] · b[k][lane + cc]` in order of `k`, over the rows of `a`; both
/// hold [`TILE`] values per `k`.
fn product_tile(a: &[f64], b: &[f64], lane: usize) -> [[f64; PC]; TILE] {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F.
        return unsafe { product_tile_avx512(a, b, lane) };
    }
    product_tile_impl(a, b, lane)
}

/// [`product_tile`] with one AVX-512 register per row of the tile (LLVM vectorizes the portable
/// loop across rows, with gathers).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn product_tile_avx512(a: &[f64], b: &[f64], lane: usize) -> [[f64; PC]; TILE] {
    use std::arch::x86_64::*;
    const { assert!(PC == 8) };
    let mut acc = [_mm512_setzero_pd(); TILE];
    for (ak, bk) in a.chunks_exact(TILE).zip(b.chunks_exact(TILE)) {
        let bk: &[f64; PC] = bk[lane..lane + PC].try_into().expect("PC divides TILE");
        // SAFETY: `bk` holds 8 f64.
        let bv = unsafe { _mm512_loadu_pd(bk.as_ptr()) };
        for (acc_r, &ar) in acc.iter_mut().zip(ak) {
            *acc_r = _mm512_add_pd(*acc_r, _mm512_mul_pd(_mm512_set1_pd(ar), bv));
        }
    }
    let mut out = [[0.0f64; PC]; TILE];
    for (o, v) in out.iter_mut().zip(acc) {
        // SAFETY: `o` holds 8 f64.
        unsafe { _mm512_storeu_pd(o.as_mut_ptr(), v) };
    }
    out
}

#[inline(always)]
fn product_tile_impl(a: &[f64], b: &[f64], lane: usize) -> [[f64; PC]; TILE] {
    let mut acc = [[0.0f64; PC]; TILE];
    for (ak, bk) in a.chunks_exact(TILE).zip(b.chunks_exact(TILE)) {
        for r in 0..TILE {
            for c in 0..PC {
                acc[r][c] += ak[r] * bk[lane + c];
            }
        }
    }
    acc
}

multiversion! {
    /// `x[j] -= e · u[j]`: the error feedback of GPTQ and SparseGPT along a row of `U`.
    pub fn subtract_scaled(x: &mut [f64], e: f64, u: &[f64]) => subtract_scaled_impl
}

#[inline(always)]
fn subtract_scaled_impl(x: &mut [f64], e: f64, u: &[f64]) {
    for (xj, &uj) in x.iter_mut().zip(u) {
        *xj -= e * uj;
    }
}

/// GPTQ's and SparseGPT's `U`: the upper Cholesky factor of `(H + λI)⁻¹` with
/// `λ = damp · mean(diag H)`; `U` is row-major and `(H + λI)⁻¹ = Uᵀ U`. Channels that never saw
/// any input (zero diagonal) get a unit diagonal. `name` identifies the linear in errors.
pub fn damped_inverse_cholesky_upper(
    hessian: Vec<f64>,
    n: usize,
    damp: f64,
    name: &str,
) -> Result<Vec<f64>> {
    // Each n × n intermediate is dropped as soon as the next is made: at most two are held.
    let mut h = hessian;
    let mean_diag = (0..n).map(|i| h[i * n + i]).sum::<f64>() / n as f64;
    let lambda = damp * if mean_diag > 0.0 { mean_diag } else { 1.0 };
    for i in 0..n {
        if h[i * n + i] == 0.0 {
            h[i * n + i] = 1.0;
        }
        h[i * n + i] += lambda;
    }
    let not_pd = |(column, pivot)| CalibError::NotPositiveDefinite {
        linear: name.to_string(),
        column,
        pivot,
    };
    let l = cholesky_lower(&h, n).map_err(not_pd)?;
    drop(h);
    let linv = invert_lower(&l, n);
    drop(l);
    // H⁻¹ = L⁻ᵀ L⁻¹: entry (i, j) = Σ_k L⁻¹[k][i] L⁻¹[k][j] over k ≥ max(i, j).
    let hinv = inverse_product(&linv);
    drop(linv);
    // GPTQ's U is upper with H⁻¹ = Uᵀ U: the transpose of the lower factor (H⁻¹ = L' L'ᵀ).
    let mut lp = cholesky_lower(&hinv, n).map_err(not_pd)?;
    drop(hinv);
    transpose_in_place(&mut lp, n);
    Ok(lp)
}

#[cfg(test)]
mod tests;
