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
