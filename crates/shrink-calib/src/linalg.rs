//! Dense symmetric positive-definite routines on the (small, ≤ a few thousand) Hessians.
//! Row-major `n × n` f64 matrices; inner loops run over contiguous rows and rows run in parallel.

use crate::{CalibError, Result};
use rayon::prelude::*;

/// Lower Cholesky factor `L` with `A = L Lᵀ`; `Err(column, pivot)` if `A` is not positive definite.
pub fn cholesky_lower(a: &[f64], n: usize) -> std::result::Result<Vec<f64>, (usize, f64)> {
    let mut l = vec![0.0; n * n];
    for j in 0..n {
        let (_, rest) = l.split_at_mut(j * n);
        let row_j = &mut rest[..n];
        let d = a[j * n + j] - row_j[..j].iter().map(|v| v * v).sum::<f64>();
        if d <= 0.0 || !d.is_finite() {
            return Err((j, d));
        }
        let d = d.sqrt();
        row_j[j] = d;
        // Column j below the diagonal: L[i][j] = (A[i][j] - L[i][..j]·L[j][..j]) / d.
        let lj: Vec<f64> = row_j[..j].to_vec();
        rest[n..]
            .par_chunks_mut(n)
            .enumerate()
            .for_each(|(off, row_i)| {
                let i = j + 1 + off;
                let dot: f64 = row_i[..j].iter().zip(&lj).map(|(x, y)| x * y).sum();
                row_i[j] = (a[i * n + j] - dot) / d;
            });
    }
    Ok(l)
}

/// Inverse of a lower-triangular matrix.
fn invert_lower(l: &[f64], n: usize) -> Vec<f64> {
    // Column by column: solve L x = e_c; columns are independent. Each column is solved in place
    // as a row of the transpose, which is then transposed: no second n × n copy.
    let mut inv = vec![0.0; n * n];
    inv.par_chunks_mut(n).enumerate().for_each(|(c, x)| {
        x[c] = 1.0 / l[c * n + c];
        for i in c + 1..n {
            let row = &l[i * n..i * n + i];
            let s: f64 = row[c..i].iter().zip(&x[c..i]).map(|(a, b)| a * b).sum();
            x[i] = -s / l[i * n + i];
        }
    });
    transpose_in_place(&mut inv, n);
    inv
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
/// k ≥ max(i, j); filled for j ≤ k, as GPTQ's factorization reads it.
fn inverse_product(linv: &[f64], n: usize) -> Vec<f64> {
    // Rows in tiles of ROWS: each row of L⁻¹ is read once per tile, not once per row (the loop is
    // memory-bound); every entry still sums its terms in order of k, so the bits are unchanged.
    const ROWS: usize = 8;
    let mut hinv = vec![0.0; n * n];
    hinv.par_chunks_mut(n * ROWS)
        .enumerate()
        .for_each(|(tile, rows)| {
            let first = tile * ROWS;
            for k in first..n {
                let lk = &linv[k * n..k * n + k + 1];
                for (r, row) in rows.chunks_mut(n).enumerate() {
                    let i = first + r;
                    let lki = if k >= i { linv[k * n + i] } else { 0.0 };
                    if lki != 0.0 {
                        for (h, &l) in row[..=k].iter_mut().zip(lk) {
                            *h += lki * l;
                        }
                    }
                }
            }
        });
    hinv
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
    let hinv = inverse_product(&linv, n);
    drop(linv);
    // GPTQ's U is upper with H⁻¹ = Uᵀ U: the transpose of the lower factor (H⁻¹ = L' L'ᵀ).
    let mut lp = cholesky_lower(&hinv, n).map_err(not_pd)?;
    drop(hinv);
    transpose_in_place(&mut lp, n);
    Ok(lp)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matmul(a: &[f64], b: &[f64], n: usize) -> Vec<f64> {
        let mut c = vec![0.0; n * n];
        for i in 0..n {
            for k in 0..n {
                for j in 0..n {
                    c[i * n + j] += a[i * n + k] * b[k * n + j];
                }
            }
        }
        c
    }

    fn transpose(a: &[f64], n: usize) -> Vec<f64> {
        (0..n * n).map(|idx| a[(idx % n) * n + idx / n]).collect()
    }

    fn spd(n: usize) -> Vec<f64> {
        // XᵀX + I for a fixed X.
        let x: Vec<f64> = (0..n * n)
            .map(|i| ((i * 7919 % 23) as f64 - 11.0) / 7.0)
            .collect();
        let mut a = matmul(&transpose(&x, n), &x, n);
        (0..n).for_each(|i| a[i * n + i] += 1.0);
        a
    }

    #[test]
    fn cholesky_reconstructs_and_hand_case() {
        // [[4, 2], [2, 3]] = L Lᵀ with L = [[2, 0], [1, √2]].
        let l = cholesky_lower(&[4.0, 2.0, 2.0, 3.0], 2).unwrap();
        let want = [2.0, 0.0, 1.0, 2f64.sqrt()];
        assert!(l.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-12));
        let n = 9;
        let a = spd(n);
        let l = cholesky_lower(&a, n).unwrap();
        let back = matmul(&l, &transpose(&l, n), n);
        assert!(back.iter().zip(&a).all(|(x, y)| (x - y).abs() < 1e-9));
        assert_eq!(cholesky_lower(&[1.0, 2.0, 2.0, 1.0], 2).unwrap_err().0, 1);
    }

    #[test]
    fn the_tiled_inverse_product_has_the_bits_of_the_row_by_row_one() {
        // n not a multiple of the tile, with zeros in L⁻¹ (skipped terms).
        for n in [1, 7, 8, 21] {
            let a = spd(n);
            let l = cholesky_lower(&a, n).unwrap();
            let mut linv = invert_lower(&l, n);
            if n > 2 {
                linv[n * n - 3] = 0.0; // L⁻¹[n-1][n-3]
            }
            let mut want = vec![0.0; n * n];
            for i in 0..n {
                for k in i..n {
                    let lki = linv[k * n + i];
                    if lki != 0.0 {
                        for j in 0..=k {
                            want[i * n + j] += lki * linv[k * n + j];
                        }
                    }
                }
            }
            assert!(inverse_product(&linv, n) == want, "n = {n}");
        }
    }

    #[test]
    fn upper_factor_of_the_damped_inverse() {
        let n = 7;
        let a = spd(n);
        let u = damped_inverse_cholesky_upper(a.clone(), n, 0.0, "test").unwrap();
        for i in 0..n {
            for j in 0..i {
                assert_eq!(u[i * n + j], 0.0, "upper triangular");
            }
        }
        // Uᵀ U A = I.
        let prod = matmul(&matmul(&transpose(&u, n), &u, n), &a, n);
        for i in 0..n {
            for j in 0..n {
                let want = if i == j { 1.0 } else { 0.0 };
                assert!(
                    (prod[i * n + j] - want).abs() < 1e-8,
                    "{i},{j}: {}",
                    prod[i * n + j]
                );
            }
        }
        let err = damped_inverse_cholesky_upper(vec![0.0, 0.0, 0.0, -5.0], 2, 0.0, "blk.0.q")
            .unwrap_err();
        assert!(err.to_string().contains("blk.0.q"), "{err}");
    }
}
