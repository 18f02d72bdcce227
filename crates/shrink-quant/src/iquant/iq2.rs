//! ggml's IQ2_XS quantizer (`quantize_row_iq2_xs_impl`, grid of 512 points of eight 2-bit
//! magnitudes): per sub-block of 16, two grid points each with 7 sign bits (a 16-bit word: index
//! and signs) and a 4-bit scale under the block's f16 scale. ggml requires an importance matrix
//! for it; shrink weights by x² without one, as ggml's other i-quants do.

use super::grid::{error_weights, sub_block, Grid, Search};
use super::nearest_int;
use half::f16;
use shrink_core::iquant::tables::IQ2XS_GRID;
use std::sync::OnceLock;

fn grid() -> &'static Grid<8> {
    static GRID: OnceLock<Grid<8>> = OnceLock::new();
    GRID.get_or_init(|| Grid::build(&IQ2XS_GRID, 3, 2, 2))
}

const SEARCH: Search = Search {
    kmax: 3,
    steps: 9,
    step: 0.1,
    eps: 1e-15,
};

/// One block of 256 weights into its 74 bytes: f16 scale, 32 words (grid index | signs << 9),
/// then eight bytes of two 4-bit sub-block scales.
pub(super) fn quantize_block(x: &[f32], qw: Option<&[f32]>, out: &mut [u8]) {
    let g = grid();
    out.fill(0);
    let weight = error_weights(x, qw, 1.0);
    let mut q2 = [0u16; 32];
    let mut scales = [0f32; 16];
    let mut max_scale = 0f32;
    for ib in 0..16 {
        let r = 16 * ib..16 * ib + 16;
        let Some(sb) = sub_block(g, &SEARCH, &x[r.clone()], &weight[r]) else {
            continue;
        };
        for k in 0..2 {
            q2[2 * ib + k] = sb.indices[k] as u16 | (sb.signs[k] as u16) << 9;
        }
        scales[ib] = sb.scale;
        max_scale = max_scale.max(sb.scale);
    }
    if max_scale == 0.0 {
        return;
    }
    let d = max_scale / 31.0;
    out[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
    for (k, &q) in q2.iter().enumerate() {
        out[2 + 2 * k..4 + 2 * k].copy_from_slice(&q.to_le_bytes());
    }
    let id = 1.0 / d;
    for (ib, &s) in scales.iter().enumerate() {
        let l = nearest_int(0.5 * (id * s - 1.0)).clamp(0, 15) as u8;
        out[66 + ib / 2] |= l << (4 * (ib % 2));
    }
}
