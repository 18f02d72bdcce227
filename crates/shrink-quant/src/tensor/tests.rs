use super::*;
use rand::{Rng, SeedableRng};

/// Weights with an exact zero, an all-zero group and one outlier.
fn weights(rows: usize, cols: usize) -> Vec<f32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let mut w: Vec<f32> = (0..rows * cols)
        .map(|_| rng.gen_range(-1f32..1.0) * 0.1)
        .collect();
    w[5] = 0.0;
    (64..96).for_each(|i| w[i] = 0.0);
    w[cols + 3] = 2.5;
    w
}

#[test]
fn rounding_straight_into_blocks_writes_the_packed_paths_bytes() {
    let (rows, cols) = (5, 128);
    let w = weights(rows, cols);
    let importance: Vec<f32> = (0..cols).map(|c| 0.5 + (c % 7) as f32).collect();
    for scheme in [
        QuantScheme::Q4_0,
        QuantScheme::Q4_1,
        QuantScheme::Q5_0,
        QuantScheme::Q5_1,
        QuantScheme::Q8_0,
    ] {
        for (search, imp) in [(false, None), (true, None), (true, Some(&importance[..]))] {
            let scheme = QuantScheme { search, ..scheme };
            let packed = crate::rtn(&w, rows, cols, &scheme, imp, "t").unwrap();
            let blocks = crate::rtn_blocks(&w, rows, cols, &scheme, imp, "t").unwrap();
            let (dtype, bytes) = packed.to_ggml_blocks().unwrap();
            let what = format!("{dtype:?} search {search} importance {}", imp.is_some());
            assert_eq!(
                (blocks.dtype, blocks.rows, blocks.cols),
                (dtype, rows, cols)
            );
            assert!(blocks.bytes == bytes, "{what}: bytes");
            // Each block read back gives the packed tensor's codes, scale and minimum.
            let codes = packed.codes();
            for (g, block) in bytes.chunks(dtype.type_size()).enumerate() {
                let (c, scale, min) = decode_block(dtype, block);
                assert_eq!(c[..], codes[g * 32..(g + 1) * 32], "{what}: codes of {g}");
                assert_eq!(scale, packed.scales[g], "{what}: scale of {g}");
                assert_eq!(min, packed.mins.get(g).copied().unwrap_or(f16::ZERO));
            }
            // Zeros counted in the blocks are the packed tensor's (the zero group among them).
            let zeros = blocks.zero_fraction().unwrap();
            assert_eq!(zeros, packed.zero_fraction(), "{what}: zeros");
            assert!(zeros >= 32.0 / (rows * cols) as f64, "{what}: {zeros}");
        }
    }
    // Not a ggml block type: refused with the tensor's name.
    let wide = QuantScheme {
        granularity: Granularity::Group(64),
        ..QuantScheme::Q4_0
    };
    let err = crate::rtn_blocks(&w, rows, cols, &wide, None, "t.weight").unwrap_err();
    assert!(err.to_string().contains("t.weight"), "{err}");
}
