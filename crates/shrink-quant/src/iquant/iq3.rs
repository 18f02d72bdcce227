//! ggml's IQ3_XXS quantizer (`quantize_row_iq3_xxs_impl`, grid of 256 points of four 3-bit
//! magnitudes): per sub-block of 32, eight grid points, 28 sign bits and a 4-bit scale under the
//! block's f16 scale (with ggml's fudge factor 1.0125).

use super::grid::{error_weights, sub_block, Grid, Search};
use super::nearest_int;
use half::f16;
use shrink_core::iquant::tables::IQ3XXS_GRID;
use std::sync::OnceLock;

fn grid() -> &'static Grid<4> {
    static GRID: OnceLock<Grid<4>> = OnceLock::new();
    GRID.get_or_init(|| {
        let table: Vec<u64> = IQ3XXS_GRID.iter().map(|&p| p as u64).collect();
        Grid::build(&table, 8, 3, 2)
    })
}

const SEARCH: Search = Search {
    kmax: 8,
    steps: 15,
    step: 0.2,
    eps: 1e-8,
};

/// One block of 256 weights into its 98 bytes: f16 scale, 64 grid indices, then per sub-block
/// a word of four 7-bit sign groups and the 4-bit scale.
pub(super) fn quantize_block(x: &[f32], qw: Option<&[f32]>, out: &mut [u8]) {
    let g = grid();
    out.fill(0);
    let weight = error_weights(x, qw, 2.0);
    let mut q3 = [0u8; 96];
    let mut scales = [0f32; 8];
    let mut max_scale = 0f32;
    for ib in 0..8 {
        let r = 32 * ib..32 * ib + 32;
        let Some(sb) = sub_block(g, &SEARCH, &x[r.clone()], &weight[r]) else {
            continue;
        };
        for (k, &index) in sb.indices.iter().enumerate() {
            q3[8 * ib + k] = index as u8;
        }
        let signs = sb
            .signs
            .iter()
            .enumerate()
            .fold(0u32, |w, (k, &s)| w | (s as u32) << (7 * k));
        q3[64 + 4 * ib..68 + 4 * ib].copy_from_slice(&signs.to_le_bytes());
        scales[ib] = sb.scale;
        max_scale = max_scale.max(sb.scale);
    }
    if max_scale == 0.0 {
        return;
    }
    let d = max_scale / 31.0;
    out[..2].copy_from_slice(&f16::from_f32(d * 1.0125).to_le_bytes());
    let id = 1.0 / d;
    for (ib, &s) in scales.iter().enumerate() {
        let l = nearest_int(0.5 * (id * s - 1.0)).clamp(0, 15) as u8;
        q3[64 + 4 * ib + 3] |= l << 4;
    }
    out[2..].copy_from_slice(&q3);
}
