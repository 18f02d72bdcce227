use super::*;

/// Deterministic pseudo-random 64-bit values.
fn stream(seed: u64) -> impl FnMut() -> u64 {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    }
}

/// Values in [-1, 1) with a few large ones (outliers set a block's scale).
fn values(len: usize, seed: u64) -> Vec<f32> {
    let mut next = stream(seed);
    (0..len)
        .map(|_| {
            let s = next();
            let u = (s >> 40) as f32 / (1u64 << 24) as f32;
            (2.0 * u - 1.0) * if s & 15 == 0 { 8.0 } else { 1.0 }
        })
        .collect()
}

/// Where each type keeps its f16 scales within a block.
fn f16_fields(ty: BlockType) -> &'static [usize] {
    match ty {
        BlockType::Q4_0 | BlockType::Q5_0 | BlockType::Q8_0 => &[0],
        BlockType::Q4_1 | BlockType::Q5_1 | BlockType::Q4K | BlockType::Q5K => &[0, 2],
        BlockType::Q2K => &[80, 82],
        BlockType::Q3K => &[108],
        BlockType::Q6K => &[208],
        BlockType::IQ4NL | BlockType::IQ4XS | BlockType::IQ3XXS | BlockType::IQ3S => &[0],
        BlockType::IQ2XXS | BlockType::IQ2XS | BlockType::IQ2S => &[0],
    }
}

/// Random blocks with finite scales of a realistic size.
fn random_matrix(ty: BlockType, rows: usize, cols: usize, seed: u64) -> QMatrix {
    let mut next = stream(seed);
    let n = rows * cols / ty.block_len() * ty.block_bytes();
    let mut data: Vec<u8> = (0..n).map(|_| next() as u8).collect();
    for block in data.chunks_mut(ty.block_bytes()) {
        for &at in f16_fields(ty) {
            let v = f16::from_f32(((next() >> 40) as f32 / (1u64 << 24) as f32 + 0.1) * 0.01);
            block[at..at + 2].copy_from_slice(&v.to_le_bytes());
        }
    }
    QMatrix::new(ty, rows, cols, data).unwrap()
}

/// llama.cpp's activation rounding written out plainly, per activation block: the codes, the
/// scale the product uses, and the unrounded scale.
fn rounded_activations(ty: BlockType, x: &[f32]) -> Vec<(Vec<f64>, f64, f32)> {
    match ty.act() {
        ActType::Q8_0 | ActType::Q8_1 => x
            .chunks(32)
            .map(|b| {
                let amax = b.iter().fold(0f32, |m, v| m.max(v.abs()));
                let id = if amax == 0.0 { 0.0 } else { 127.0 / amax };
                let q = b
                    .iter()
                    .map(|&v| (v * id).round_ties_even() as f64)
                    .collect();
                (q, f16::from_f32(amax / 127.0).to_f32() as f64, amax / 127.0)
            })
            .collect(),
        ActType::Q8K => x
            .chunks(256)
            .map(|b| {
                let max = b
                    .iter()
                    .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
                let iscale = -127.0 / max;
                let q = b
                    .iter()
                    .map(|&v| (iscale * v).round_ties_even().min(127.0) as f64)
                    .collect();
                (q, (1.0 / iscale) as f64, 0.0)
            })
            .collect(),
    }
}

/// `Σ w·a` in f64 from the dequantized weights and the rounded activations; Q4_1/Q5_1's minimum
/// `m` times the activation block's stored f16 `d · Σq`, as llama.cpp computes it.
fn reference(w: &QMatrix, x: &[f32], t: usize) -> Vec<f64> {
    let (n, k, ty) = (w.rows(), w.cols(), w.block_type());
    let weights = w.dequantize();
    let mut y = vec![0f64; t * n];
    for tok in 0..t {
        let blocks = rounded_activations(ty, &x[tok * k..(tok + 1) * k]);
        let bl = k / blocks.len();
        for r in 0..n {
            let mut s = 0f64;
            for (b, (q, d, d_raw)) in blocks.iter().enumerate() {
                let wb = &weights[r * k + b * bl..r * k + (b + 1) * bl];
                let m = if ty.mins() == Mins::PerBlock {
                    decoded::f16_at(w.row(r), b * ty.block_bytes() + 2) as f64
                } else {
                    0.0
                };
                s += wb
                    .iter()
                    .zip(q)
                    .map(|(w, q)| (*w as f64 - m) * q * d)
                    .sum::<f64>();
                let q_sum: f64 = q.iter().sum();
                s += m * f16::from_f32(d_raw * q_sum as f32).to_f32() as f64;
            }
            y[tok * n + r] = s;
        }
    }
    y
}

#[test]
fn every_type_computes_the_rounded_activations_product() {
    for (i, ty) in BlockType::ALL.into_iter().enumerate() {
        let (n, k, t) = (7, 2 * ty.block_len().max(256), 19);
        let w = random_matrix(ty, n, k, i as u64 + 1);
        let x = values(t * k, 100 + i as u64);
        let want = reference(&w, &x, t);
        for kernel in kernel::Kernel::available() {
            let got = w.matmul_with(kernel, &x, t);
            for (j, (&g, &e)) in got.iter().zip(&want).enumerate() {
                let scale = e.abs().max(1e-3);
                assert!(
                    ((g as f64 - e) / scale).abs() < 1e-4,
                    "{ty:?} {kernel:?} output {j}: {g} vs {e}"
                );
            }
        }
    }
}

#[test]
fn kernels_agree_bit_for_bit_at_every_tile_edge() {
    for (i, ty) in BlockType::ALL.into_iter().enumerate() {
        let k = ty.block_len().max(256);
        // From 16 tokens on, 4-bit codes are unpacked per panel instead of per step.
        for (n, t) in [(1, 1), (3, 5), (16, 4), (17, 7), (33, 9), (33, 18)] {
            let w = random_matrix(ty, n, k, 7 + i as u64);
            let x = values(t * k, 11 + i as u64);
            let portable = w.matmul_with(kernel::Kernel::Portable, &x, t);
            for kernel in kernel::Kernel::available() {
                let got = w.matmul_with(kernel, &x, t);
                assert!(
                    got.iter()
                        .zip(&portable)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{ty:?} {kernel:?} n {n} t {t}"
                );
            }
            // One token's output does not depend on the tokens beside it.
            let alone = w.matmul_with(kernel::Kernel::Portable, &x[..k], 1);
            assert_eq!(alone[..], portable[..n], "{ty:?} n {n} t {t}");
        }
    }
}

#[test]
fn activation_rounding_is_llama_cpp_s() {
    // A q8_0 block: max |x| = 2.54 gives d = 0.02 (f16 0.02000427), codes x·127/2.54 rounded
    // half to even: 0.25 → 12.5 → 12, 0.27 → 13.5 → 14, −2.54 → −127.
    let mut x = vec![0f32; 32];
    x[0] = 0.25;
    x[1] = 0.27;
    x[2] = -2.54;
    let a = Activations::quantize(ActType::Q8_0, &x, 1, 32);
    assert_eq!(a.codes[..3], [12, 14, -127]);
    assert_eq!(a.d[0], f16::from_f32(0.02).to_f32());
    assert_eq!(a.sums[0], 12 + 14 - 127);
    // q8_K: scaled by −127 / max, where max is the signed value of largest magnitude.
    let mut x = vec![0f32; 256];
    x[0] = -4.0;
    x[1] = 1.0;
    let a = Activations::quantize(ActType::Q8K, &x, 1, 256);
    // iscale = −127 / −4 = 31.75: −4 → −127, 1 → 31.75 → 32; the scale is 1 / iscale.
    assert_eq!((a.codes[0], a.codes[1]), (-127, 32));
    assert_eq!(a.d[0], 1.0 / 31.75);
}

#[test]
fn refuses_ragged_rows_and_wrong_sizes() {
    assert_eq!(
        QMatrix::new(BlockType::Q4K, 1, 576, vec![0; 144 * 2]),
        Err(QMatrixError::Ragged {
            ty: BlockType::Q4K,
            block: 256,
            cols: 576
        })
    );
    assert!(matches!(
        QMatrix::new(BlockType::Q4_0, 2, 64, vec![0; 70]),
        Err(QMatrixError::Size { expected: 72, .. })
    ));
}

#[test]
fn permuted_rows_move_whole_rows() {
    let w = random_matrix(BlockType::Q6K, 3, 256, 5);
    let p = w.permute_rows(&[2, 0, 1]);
    assert_eq!(p.row(0), w.row(2));
    assert_eq!(p.row(1), w.row(0));
    assert_eq!(p.row(2), w.row(1));
}

#[test]
fn i_quant_codes_are_the_dequantizers_values() {
    use crate::iquant::IQuant;
    // The codes, scales and factor taken apart for the kernels give back ggml's dequantization
    // (`IQuant::dequantize_row`, checked against ggml's own) bit for bit.
    for (ty, iq) in [
        (BlockType::IQ4NL, IQuant::IQ4NL),
        (BlockType::IQ4XS, IQuant::IQ4XS),
        (BlockType::IQ3XXS, IQuant::IQ3XXS),
        (BlockType::IQ3S, IQuant::IQ3S),
        (BlockType::IQ2XXS, IQuant::IQ2XXS),
        (BlockType::IQ2XS, IQuant::IQ2XS),
        (BlockType::IQ2S, IQuant::IQ2S),
    ] {
        let (rows, cols) = (3, 512);
        let w = random_matrix(ty, rows, cols, 9);
        let mut theirs = vec![0f32; rows * cols];
        for (r, out) in theirs.chunks_mut(cols).enumerate() {
            iq.dequantize_row(w.row(r), out);
        }
        let ours = w.dequantize();
        assert!(
            ours.iter()
                .zip(&theirs)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{ty:?}"
        );
    }
}
