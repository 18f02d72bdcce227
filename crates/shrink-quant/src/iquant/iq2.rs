//! ggml's IQ2 quantizers (`quantize_row_iq2_{xxs,xs,s}_impl`), grids of points of eight 2-bit
//! magnitudes: IQ2_XXS (256 points; per sub-block of 32 four indices, 28 sign bits and a 4-bit
//! scale), IQ2_XS (512 points; per sub-block of 16 two 16-bit words of index and seven sign bits,
//! a 4-bit scale) and IQ2_S (1024 points; per sub-block of 16 two 10-bit indices, sixteen sign
//! bits, a 4-bit scale). ggml requires an importance matrix for IQ2_XXS and IQ2_XS; shrink
//! weights by x² without one, as ggml's other i-quants do.

use super::grid::{block_scales, error_weights, sub_block, Grid, Refit, Search};
use super::octet::write_octets;
use shrink_core::iquant::tables::{IQ2S_GRID, IQ2XS_GRID, IQ2XXS_GRID};
use shrink_core::iquant::IQuant;
use std::sync::OnceLock;

fn grid(kind: IQuant) -> &'static Grid<8> {
    static XXS: OnceLock<Grid<8>> = OnceLock::new();
    static XS: OnceLock<Grid<8>> = OnceLock::new();
    static S: OnceLock<Grid<8>> = OnceLock::new();
    match kind {
        IQuant::IQ2XXS => XXS.get_or_init(|| Grid::build(&IQ2XXS_GRID, 3, 2, 2)),
        IQuant::IQ2XS => XS.get_or_init(|| Grid::build(&IQ2XS_GRID, 3, 2, 2)),
        _ => S.get_or_init(|| Grid::build(&IQ2S_GRID, 3, 2, 1)),
    }
}

fn search(kind: IQuant) -> Search {
    Search {
        kmax: 3,
        steps: if kind == IQuant::IQ2XXS { 6 } else { 9 },
        step: 0.1,
        eps: if kind == IQuant::IQ2S { 1e-8 } else { 1e-15 },
        parity: kind != IQuant::IQ2S,
        qp_start: kind == IQuant::IQ2XXS,
        refit: if kind == IQuant::IQ2XXS {
            Refit::All
        } else {
            Refit::OffGrid
        },
    }
}

/// One block of 256 weights of `kind` (IQ2_XXS: 66 bytes, IQ2_XS: 74, IQ2_S: 82).
pub(super) fn quantize_block(kind: IQuant, x: &[f32], qw: Option<&[f32]>, out: &mut [u8]) {
    let (g, s) = (grid(kind), search(kind));
    out.fill(0);
    let (sub, weight) = match kind {
        IQuant::IQ2XXS => (32, error_weights(x, qw, 1.0, 0.0)),
        IQuant::IQ2XS => (16, error_weights(x, qw, 1.0, 0.0)),
        _ => (16, error_weights(x, qw, 2.0, 0.25)),
    };
    let mut scales = vec![0f32; 256 / sub];
    let mut codes = [0u32; 32];
    for (ib, scale) in scales.iter_mut().enumerate() {
        let r = sub * ib..sub * ib + sub;
        let Some(sb) = sub_block(g, &s, &x[r.clone()], &weight[r]) else {
            continue;
        };
        *scale = sb.scale;
        let octets = codes[sub / 8 * ib..].iter_mut();
        for (code, (&index, &signs)) in octets.zip(sb.indices.iter().zip(&sb.signs)) {
            *code = index as u32 | (signs as u32) << 20;
        }
    }
    write_octets(kind, out, &codes);
    let fudge = if kind == IQuant::IQ2S { 0.9875 } else { 1.0 };
    let Some((d, ls)) = block_scales(&scales, fudge) else {
        out.fill(0);
        return;
    };
    out[..2].copy_from_slice(&d);
    for (ib, &l) in ls.iter().enumerate() {
        match kind {
            IQuant::IQ2XXS => out[9 + 8 * ib] |= l << 4,
            IQuant::IQ2XS => out[66 + ib / 2] |= l << (4 * (ib % 2)),
            _ => out[74 + ib / 2] |= l << (4 * (ib % 2)),
        }
    }
}
