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
fn hand_made_blocks_dequantize_to_their_values() {
    // IQ4_NL: scale 0.5, indices 0..15 then 15..0.
    let mut nl = vec![0u8; 18];
    nl[..2].copy_from_slice(&f16::from_f32(0.5).to_le_bytes());
    for j in 0..16 {
        nl[2 + j] = j as u8 | ((15 - j) as u8) << 4;
    }
    let mut y = vec![0f32; 32];
    IQuant::IQ4NL.dequantize_row(&nl, &mut y);
    for j in 0..16 {
        assert_eq!(y[j], 0.5 * KVALUES_IQ4NL[j] as f32);
        assert_eq!(y[16 + j], 0.5 * KVALUES_IQ4NL[15 - j] as f32);
    }
    // IQ4_XS: scale 2, sub-block k with 6-bit scale 32 + k - 4 (so k - 4 times 2), index 9.
    let mut xs = vec![0u8; 136];
    xs[..2].copy_from_slice(&f16::from_f32(2.0).to_le_bytes());
    let mut high = 0u16;
    for k in 0..8 {
        let ls = (32 + k - 4) as u8;
        xs[4 + k / 2] |= (ls & 0xf) << (4 * (k % 2));
        high |= ((ls >> 4) as u16) << (2 * k);
    }
    xs[2..4].copy_from_slice(&high.to_le_bytes());
    xs[8..].fill(0x99);
    let mut y = vec![0f32; 256];
    IQuant::IQ4XS.dequantize_row(&xs, &mut y);
    for (k, sub) in y.chunks(32).enumerate() {
        let want = 2.0 * (k as f32 - 4.0) * KVALUES_IQ4NL[9] as f32;
        assert!(sub.iter().all(|&v| v == want), "sub-block {k}: {sub:?}");
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
            kind.quantize_row(&row, imp, &mut blocks);
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
        kind.quantize_row(&zeros, None, &mut blocks);
        let mut back = vec![1f32; kind.block_size()];
        kind.dequantize_row(&blocks, &mut back);
        assert!(back.iter().all(|&v| v == 0.0), "{kind:?}");
    }
}
