use super::*;

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
fn hand_made_iq3_xxs_block_dequantizes_to_its_values() {
    // Scale 1; sub-block k has 4-bit scale k (db = (0.5 + k)/2), grid point k in every group, and
    // sign pattern 1 (minus on its first weight, and by parity on its eighth) in group 0 only.
    let mut b = vec![0u8; 98];
    b[..2].copy_from_slice(&f16::from_f32(1.0).to_le_bytes());
    for k in 0..8 {
        b[2 + 8 * k..10 + 8 * k].fill(k as u8);
        let word = (k as u32) << 28 | 1;
        b[66 + 4 * k..70 + 4 * k].copy_from_slice(&word.to_le_bytes());
    }
    let mut y = vec![0f32; 256];
    IQuant::IQ3XXS.dequantize_row(&b, &mut y);
    assert_eq!(KSIGNS_IQ2XS[1], 0x81);
    for (k, sub) in y.chunks(32).enumerate() {
        let db = (0.5 + k as f32) * 0.5;
        let point = IQ3XXS_GRID[k].to_le_bytes();
        for (i, &v) in sub.iter().enumerate() {
            let sign = if i == 0 || i == 7 { -1.0 } else { 1.0 };
            assert_eq!(
                v,
                sign * db * point[i % 4] as f32,
                "sub-block {k}, weight {i}"
            );
        }
    }
}
