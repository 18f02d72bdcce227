//! ggml's IQ3 quantizers (`quantize_row_iq3_xxs_impl`, `quantize_row_iq3_s_impl`), grids of points
//! of four 3-bit magnitudes, a 4-bit scale per sub-block of 32: IQ3_XXS (256 points; eight 8-bit
//! indices, 28 sign bits by parity; ggml's fudge factor 1.0125 on the block scale) and IQ3_S
//! (512 points; eight 9-bit indices, 32 sign bits; fudge 1.033).

use super::grid::{block_scales, error_weights, sub_block, Grid, Refit, Search};
use super::octet::write_octets;
use shrink_core::iquant::tables::{IQ3S_GRID, IQ3XXS_GRID};
use shrink_core::iquant::IQuant;
use std::sync::OnceLock;

fn grid(kind: IQuant) -> &'static Grid<4> {
    static XXS: OnceLock<Grid<4>> = OnceLock::new();
    static S: OnceLock<Grid<4>> = OnceLock::new();
    let build = |table: &[u32], nwant| {
        let table: Vec<u64> = table.iter().map(|&p| p as u64).collect();
        Grid::build(&table, 8, 3, nwant)
    };
    match kind {
        IQuant::IQ3XXS => XXS.get_or_init(|| build(&IQ3XXS_GRID, 2)),
        _ => S.get_or_init(|| build(&IQ3S_GRID, 3)),
    }
}

fn search(kind: IQuant) -> Search {
    let xxs = kind == IQuant::IQ3XXS;
    Search {
        kmax: 8,
        steps: if xxs { 15 } else { 9 },
        step: 0.2,
        eps: if xxs { 1e-8 } else { 0.0 },
        parity: xxs,
        qp_start: false,
        refit: if xxs {
            Refit::OffGrid
        } else {
            Refit::AllIfAnyOff
        },
    }
}

/// One block of 256 weights of `kind` (IQ3_XXS: 98 bytes, IQ3_S: 110).
pub(super) fn quantize_block(kind: IQuant, x: &[f32], qw: Option<&[f32]>, out: &mut [u8]) {
    let (g, s) = (grid(kind), search(kind));
    out.fill(0);
    let weight = error_weights(x, qw, 2.0, 0.0);
    let mut scales = [0f32; 8];
    let mut codes = [0u32; 32];
    for (ib, scale) in scales.iter_mut().enumerate() {
        let r = 32 * ib..32 * ib + 32;
        let Some(sb) = sub_block(g, &s, &x[r.clone()], &weight[r]) else {
            continue;
        };
        *scale = sb.scale;
        // Two points of four per octet of weights.
        for (l, code) in codes[4 * ib..4 * ib + 4].iter_mut().enumerate() {
            let (i0, i1) = (sb.indices[2 * l] as u32, sb.indices[2 * l + 1] as u32);
            *code = i0 | i1 << 10 | (sb.signs[l] as u32) << 20;
        }
    }
    write_octets(kind, out, &codes);
    let fudge = if kind == IQuant::IQ3XXS {
        1.0125
    } else {
        1.033
    };
    let Some((d, ls)) = block_scales(&scales, fudge) else {
        out.fill(0);
        return;
    };
    out[..2].copy_from_slice(&d);
    for (ib, &l) in ls.iter().enumerate() {
        match kind {
            IQuant::IQ3XXS => out[69 + 4 * ib] |= l << 4,
            _ => out[106 + ib / 2] |= l << (4 * (ib % 2)),
        }
    }
}
