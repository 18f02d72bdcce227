use super::*;

/// Deterministic values in [-1, 1) with a spread of magnitudes, so sums round differently in
/// different orders.
fn values(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let u = (s >> 40) as f32 / (1u64 << 24) as f32;
            (2.0 * u - 1.0) * if s & 3 == 0 { 100.0 } else { 1.0 }
        })
        .collect()
}

/// The definition: one fused multiply-add chain over p in order per output.
fn reference(m: usize, n: usize, k: usize, a: Operand, b: Operand, c: &mut [f32], acc: bool) {
    for i in 0..m {
        for j in 0..n {
            let mut s = if acc { c[i * n + j] } else { 0.0 };
            for p in 0..k {
                let x = a.data[i * a.row_stride + p * a.col_stride];
                let y = b.data[p * b.row_stride + j * b.col_stride];
                s = x.mul_add(y, s);
            }
            c[i * n + j] = s;
        }
    }
}

const SHAPES: [(usize, usize, usize); 11] = [
    (1, 1, 1),
    // One row (a decoding step): columns past one task's 64 and a masked last vector.
    (1, 70, 64),
    (1, 64, 530),
    (1, 131, 2100),
    (3, 5, 7),
    (8, 32, 16),
    (17, 33, 65),
    (40, 70, 0),
    (9, 100, 130),
    (64, 64, 300),
    // k past one block of KC: the chain carried through the output between blocks.
    (13, 40, 2100),
];

#[test]
fn every_kernel_computes_the_one_fma_chain_per_output_bit_for_bit() {
    for (s, &(m, n, k)) in SHAPES.iter().enumerate() {
        let a = values(m * k, s as u64);
        let w = values(n * k, 100 + s as u64);
        let c0 = values(m * n, 200 + s as u64);
        for (b, acc) in [
            (Operand::transposed(&w, k), false),
            (Operand::row_major(&w, n), true),
        ] {
            let mut want = c0.clone();
            reference(m, n, k, Operand::row_major(&a, k), b, &mut want, acc);
            for kernel in Kernel::available() {
                let mut got = c0.clone();
                gemm_with(
                    kernel,
                    m,
                    n,
                    k,
                    Operand::row_major(&a, k),
                    b,
                    &mut got,
                    acc,
                    false,
                );
                let same = got
                    .iter()
                    .zip(&want)
                    .all(|(x, y)| x.to_bits() == y.to_bits());
                assert!(same, "{kernel:?} {m}×{n}×{k} accumulate {acc}");
            }
        }
    }
}

#[test]
fn the_thread_count_does_not_change_a_bit() {
    let (m, n, k) = (70, 150, 200);
    let a = values(m * k, 1);
    let w = values(n * k, 2);
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("thread pool");
        pool.install(|| {
            let mut c = vec![0.0; m * n];
            gemm(
                m,
                n,
                k,
                Operand::row_major(&a, k),
                Operand::transposed(&w, k),
                &mut c,
                false,
            );
            let mut g = vec![0.0; k * k];
            gram(&a, m, k, &mut g);
            (c, g)
        })
    };
    let one = run(1);
    for threads in [2, 3] {
        let other = run(threads);
        assert!(one
            .0
            .iter()
            .zip(&other.0)
            .all(|(x, y)| x.to_bits() == y.to_bits()));
        assert!(one
            .1
            .iter()
            .zip(&other.1)
            .all(|(x, y)| x.to_bits() == y.to_bits()));
    }
}

#[test]
fn gram_is_the_exactly_symmetric_product_of_the_rows() {
    for &(rows, n) in &[(1, 1), (5, 3), (33, 40), (100, 70)] {
        let x = values(rows * n, (rows * n) as u64);
        let mut want = vec![0.0; n * n];
        reference(
            n,
            n,
            rows,
            Operand::transposed(&x, n),
            Operand::row_major(&x, n),
            &mut want,
            false,
        );
        for kernel in Kernel::available() {
            let mut got = vec![f32::NAN; n * n];
            gram_with(kernel, &x, rows, n, &mut got);
            for i in 0..n {
                for j in 0..n {
                    let (lo, hi) = (i.min(j), i.max(j));
                    assert_eq!(got[i * n + j].to_bits(), want[lo * n + hi].to_bits());
                }
            }
        }
    }
}

#[test]
fn a_kernel_is_named_by_the_environment_or_refused() {
    // Only the names: the variable is process-wide, so it is not set here.
    assert_eq!(Kernel::named("portable"), Ok(Kernel::Portable));
    let err = Kernel::named("avx1024").unwrap_err();
    assert!(
        err.contains("SHRINK_KERNEL=avx1024") && err.contains("portable"),
        "{err}"
    );
    assert!(Kernel::available().contains(&Kernel::Portable));
    assert_eq!(Kernel::available().last(), Some(&Kernel::detect()));
    assert!(Kernel::current() <= Kernel::detect());
}
