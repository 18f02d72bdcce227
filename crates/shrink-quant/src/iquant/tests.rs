use super::*;

#[test]
fn codebook_lookup_is_ggml_s() {
    let v = &KVALUES_IQ4NL;
    assert!(v.windows(2).all(|w| w[0] < w[1]), "sorted");
    assert_eq!(best_index(v, -500.0), 0);
    assert_eq!(best_index(v, 500.0), 15);
    // Nearest, and halfway between -10 and 1 goes up (ggml's strict `<`).
    assert_eq!(best_index(v, 0.0), 8);
    assert_eq!(best_index(v, -4.5), 8);
    assert_eq!(best_index(v, -4.6), 7);
    assert_eq!(best_index(v, 112.0), 15);
    for (x, want) in [(2.5f32, 2), (3.5, 4), (-2.5, -2), (31.49, 31)] {
        assert_eq!(nearest_int(x), want, "{x}");
    }
}

#[test]
fn quantized_rows_come_back_close_and_zeros_stay_zero() {
    let row: Vec<f32> = (0..512)
        .map(|i| ((i * 7919 % 1009) as f32 / 504.5 - 1.0) * if i % 61 == 0 { 6.0 } else { 1.0 })
        .collect();
    let importance: Vec<f32> = (0..512).map(|i| 0.2 + (i % 13) as f32).collect();
    for kind in [IQuant::IQ4NL, IQuant::IQ4XS] {
        for imp in [None, Some(&importance[..])] {
            let mut blocks = vec![0u8; kind.row_bytes(512)];
            quantize_row(kind, &row, imp, &mut blocks);
            let mut back = vec![0f32; 512];
            kind.dequantize_row(&blocks, &mut back);
            let rel = row
                .iter()
                .zip(&back)
                .map(|(a, b)| (a - b).powi(2))
                .sum::<f32>()
                / row.iter().map(|a| a * a).sum::<f32>();
            // 4-bit codebooks: about 1% of the energy.
            assert!(rel < 0.03, "{kind:?} {}: {rel}", imp.is_some());
        }
        let zeros = vec![0f32; kind.block_size()];
        let mut blocks = vec![0xffu8; kind.type_size()];
        quantize_row(kind, &zeros, None, &mut blocks);
        let mut back = vec![1f32; kind.block_size()];
        kind.dequantize_row(&blocks, &mut back);
        assert!(back.iter().all(|&v| v == 0.0), "{kind:?}");
    }
}
