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

/// The textbook loops the tiled routines must reproduce bit for bit.
fn cholesky_row_by_row(a: &[f64], n: usize) -> Vec<f64> {
    let mut l = vec![0.0; n * n];
    for j in 0..n {
        let d = a[j * n + j] - (0..j).map(|k| l[j * n + k] * l[j * n + k]).sum::<f64>();
        let d = d.sqrt();
        l[j * n + j] = d;
        for i in j + 1..n {
            let dot: f64 = (0..j).map(|k| l[i * n + k] * l[j * n + k]).sum();
            l[i * n + j] = (a[i * n + j] - dot) / d;
        }
    }
    l
}

fn invert_column_by_column(l: &[f64], n: usize) -> Vec<f64> {
    let mut inv = vec![0.0; n * n];
    for c in 0..n {
        let mut x = vec![0.0; n];
        x[c] = 1.0 / l[c * n + c];
        for i in c + 1..n {
            let s: f64 = (c..i).map(|k| l[i * n + k] * x[k]).sum();
            x[i] = -s / l[i * n + i];
        }
        (0..n).for_each(|i| inv[i * n + c] = x[i]);
    }
    inv
}

fn bits(v: &[f64]) -> Vec<u64> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn the_tiled_factorization_inverse_and_product_have_the_bits_of_the_textbook_loops() {
    // Sizes around the tile, and a matrix with a block of exact zeros (channels that share no
    // input), which makes exact zeros in L and its inverse.
    for n in [1, 2, 15, 16, 17, 33, 50] {
        let mut a = spd(n);
        if n > 20 {
            for i in 0..10 {
                for j in 12..n {
                    a[i * n + j] = 0.0;
                    a[j * n + i] = 0.0;
                }
            }
            (0..n).for_each(|i| a[i * n + i] += n as f64);
        }
        let want = cholesky_row_by_row(&a, n);
        let l = cholesky_lower(&a, n).unwrap();
        assert_eq!(bits(&l), bits(&want), "cholesky n = {n}");
        let panels = invert_lower(&l, n);
        let linv = panels.to_square();
        assert_eq!(
            bits(&linv),
            bits(&invert_column_by_column(&l, n)),
            "inverse n = {n}"
        );
        // The product, row by row over k with zero terms skipped, on the lower triangle.
        let mut want = vec![0.0; n * n];
        for i in 0..n {
            for k in i..n {
                let lki = linv[k * n + i];
                if lki != 0.0 {
                    for j in 0..=i {
                        want[i * n + j] += lki * linv[k * n + j];
                    }
                }
            }
        }
        assert_eq!(
            bits(&inverse_product(&panels)),
            bits(&want),
            "product n = {n}"
        );
    }
    // A pivot that is not positive is reported in its column, inside and after a panel.
    for n in [3, 20] {
        let mut a = spd(n);
        let bad = n - 1;
        a[bad * n + bad] = -1.0;
        assert_eq!(cholesky_lower(&a, n).unwrap_err().0, bad);
    }
}

#[test]
fn the_product_tile_has_the_same_bits_on_every_simd_width() {
    let n = 3 * TILE;
    let a: Vec<f64> = (0..n * TILE)
        .map(|i| ((i * 37 % 101) as f64 - 50.0) / 7.0)
        .collect();
    let b: Vec<f64> = (0..n * TILE)
        .map(|i| ((i * 53 % 97) as f64 - 48.0) / 3.0)
        .collect();
    for lane in [0, PC] {
        let (fast, portable) = (product_tile(&a, &b, lane), product_tile_impl(&a, &b, lane));
        assert_eq!(bits(fast.as_flattened()), bits(portable.as_flattened()));
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
    let err =
        damped_inverse_cholesky_upper(vec![0.0, 0.0, 0.0, -5.0], 2, 0.0, "blk.0.q").unwrap_err();
    assert!(err.to_string().contains("blk.0.q"), "{err}");
}
