use super::*;

fn sample(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let k = (i as u32).wrapping_mul(2654435761).wrapping_add(seed * 97);
            ((k % 2001) as f32 / 1000.0 - 1.0) * if i % 37 == 0 { 3.0 } else { 0.2 }
        })
        .collect()
}

/// Our reading of each block (grids + codes) reproduces candle's dequantizer exactly, and
/// rewriting codes is an exact inverse: the layouts agree bit for bit.
#[test]
fn block_layouts_agree_with_candles_dequantizer() {
    let (rows, cols) = (3, 512);
    let w = sample(rows * cols, 1);
    for k in KQuant::ALL {
        let q = GgmlTensor::quantize(&w, rows, cols, k.ggml(), None, "t").unwrap();
        let deq = q.dequantize().unwrap();
        let mut rewritten = q.bytes.clone();
        for (bi, block) in q.bytes.chunks(k.block_bytes()).enumerate() {
            let grids = k.grids(block);
            let mut codes = vec![0u8; QK_K];
            for (y, code) in codes.iter_mut().enumerate() {
                let x = deq[bi * QK_K + y];
                let g = &grids[y / k.group()];
                let (c, v) = g.nearest(x);
                assert_eq!(v, x, "{k:?} block {bi} weight {y}");
                *code = c;
            }
            // Scrambled codes written and read back give the values the grids predict.
            let scrambled: Vec<u8> = codes
                .iter()
                .enumerate()
                .map(|(y, &c)| (c as usize + y) as u8 % (grids[0].qmax + 1))
                .collect();
            let block_out = &mut rewritten[bi * k.block_bytes()..(bi + 1) * k.block_bytes()];
            k.write_codes(block_out, &scrambled);
            let t = GgmlTensor {
                dtype: k.ggml(),
                rows: 1,
                cols: QK_K,
                bytes: block_out.to_vec(),
            };
            let back = t.dequantize().unwrap();
            for y in 0..QK_K {
                assert_eq!(
                    back[y],
                    grids[y / k.group()].value(scrambled[y]),
                    "{k:?} {y}"
                );
            }
            k.write_codes(block_out, &codes);
            assert_eq!(block_out, block, "{k:?} codes round trip");
        }
    }
}

#[test]
fn importance_weighting_lowers_weighted_error() {
    let (rows, cols) = (8, 256);
    let w = sample(rows * cols, 2);
    let imp: Vec<f32> = (0..cols)
        .map(|c| if c % 5 == 0 { 50.0 } else { 0.1 })
        .collect();
    for k in KQuant::ALL {
        let err = |q: &GgmlTensor| -> f64 {
            let d = q.dequantize().unwrap();
            (0..rows * cols)
                .map(|i| ((w[i] - d[i]) as f64).powi(2) * imp[i % cols] as f64)
                .sum()
        };
        let plain = GgmlTensor::quantize(&w, rows, cols, k.ggml(), None, "t").unwrap();
        let weighted = GgmlTensor::quantize(&w, rows, cols, k.ggml(), Some(&imp), "t").unwrap();
        assert!(err(&weighted) < err(&plain), "{k:?}");
        assert!((plain.bits_per_weight() - weighted.bits_per_weight()).abs() < 1e-12);
    }
}

#[test]
fn bad_shapes_and_values_are_named() {
    let w = vec![0.5f32; 2 * 576];
    let e = GgmlTensor::quantize(&w, 2, 576, GgmlType::Q4K, None, "blk.0.attn_q")
        .unwrap_err()
        .to_string();
    assert!(e.contains("blk.0.attn_q") && e.contains("256"), "{e}");
    let mut w = vec![0.5f32; 256];
    w[9] = f32::NAN;
    let e = GgmlTensor::quantize(&w, 1, 256, GgmlType::Q6K, None, "x")
        .unwrap_err()
        .to_string();
    assert!(e.contains("index 9"), "{e}");
}

/// Writing a block's scales is the exact inverse of reading them, and scales written anywhere in
/// their ranges are read back by candle's dequantizer (a port of ggml's) as the grids say: the
/// scale layouts agree bit for bit with candle's.
#[test]
fn scale_layouts_round_trip_and_agree_with_candles_dequantizer() {
    let (rows, cols) = (2, 512);
    let w = sample(rows * cols, 3);
    for k in KQuant::ALL {
        let q = GgmlTensor::quantize(&w, rows, cols, k.ggml(), None, "t").unwrap();
        let deq = q.dequantize().unwrap();
        for (bi, block) in q.bytes.chunks(k.block_bytes()).enumerate() {
            let s = k.scales(block);
            let grids = k.grids(block);
            let mut out = vec![0u8; k.block_bytes()];
            let codes: Vec<u8> = (0..QK_K)
                .map(|y| grids[y / k.group()].nearest(deq[bi * QK_K + y]).0)
                .collect();
            k.write_codes(&mut out, &codes);
            k.write_scales(&mut out, &s);
            assert_eq!(out, block, "{k:?} block {bi}: scales and codes round trip");
            // Every scale and minimum of the ranges, spread over the groups.
            let (lo, hi) = k.scale_range();
            let n = s.sc.len();
            let spread = KScales {
                d: half::f16::from_f32(0.01),
                dmin: if k.min_max().is_some() {
                    half::f16::from_f32(0.003)
                } else {
                    half::f16::ZERO
                },
                sc: (0..n as i32)
                    .map(|g| lo + (g * 7 + bi as i32 * 5) % (hi - lo + 1))
                    .collect(),
                mn: (0..n as i32)
                    .map(|g| k.min_max().map_or(0, |m| (g * 5 + 3) % (m + 1)))
                    .collect(),
            };
            k.write_scales(&mut out, &spread);
            assert_eq!(k.scales(&out), spread, "{k:?}");
            let grids = k.grids(&out);
            let t = GgmlTensor {
                dtype: k.ggml(),
                rows: 1,
                cols: QK_K,
                bytes: out.clone(),
            };
            let back = t.dequantize().unwrap();
            for y in 0..QK_K {
                assert_eq!(back[y], grids[y / k.group()].value(codes[y]), "{k:?} {y}");
            }
        }
    }
    // The extremes are representable.
    for k in KQuant::ALL {
        let (lo, hi) = k.scale_range();
        for v in [lo, hi] {
            let s = KScales {
                d: half::f16::ONE,
                dmin: half::f16::ZERO,
                sc: vec![v; QK_K / k.group()],
                mn: vec![k.min_max().unwrap_or(0); QK_K / k.group()],
            };
            let mut out = vec![0u8; k.block_bytes()];
            k.write_scales(&mut out, &s);
            let mut expect = s.clone();
            if k.min_max().is_none() {
                expect.mn = vec![0; QK_K / k.group()];
            }
            assert_eq!(k.scales(&out), expect, "{k:?} {v}");
        }
    }
}
