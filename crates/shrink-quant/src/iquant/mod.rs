//! Quantizers of llama.cpp's i-quant block types ([`shrink_core::iquant`] holds the layouts and
//! dequantizers): ggml's importance-weighted quantizers (`ggml-quants.c`) with its f32 arithmetic
//! in its order (the reference build compiles them without fused multiply-adds), so that a row
//! quantized here is the row `ggml_quantize_chunk` writes.
//!
//! ```
//! use shrink_core::iquant::IQuant;
//! let row: Vec<f32> = (0..256).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
//! let mut blocks = vec![0u8; IQuant::IQ4XS.row_bytes(256)];
//! shrink_quant::iquant::quantize_row(IQuant::IQ4XS, &row, None, &mut blocks);
//! let mut back = vec![0f32; 256];
//! IQuant::IQ4XS.dequantize_row(&blocks, &mut back);
//! let err: f32 = row.iter().zip(&back).map(|(a, b)| (a - b).powi(2)).sum::<f32>() / 256.0;
//! assert!(err < 5e-3, "{err}"); // the rows mean square is 0.33
//! ```

mod grid;
mod iq2;
mod iq3;
mod octet;

pub use octet::{is_grid, nearest_octet, octet_scales, write_octets, OCTET};

use half::f16;
use shrink_core::iquant::tables::KVALUES_IQ4NL;
use shrink_core::iquant::IQuant;

/// ggml's `GROUP_MAX_EPS`: a group with a smaller magnitude is stored as zeros.
const GROUP_MAX_EPS: f32 = 1e-15;

/// Quantizes one row (`row.len()` a multiple of the block size) into `out`, as
/// `ggml_quantize_chunk` does: with `importance` (one weight per column, llama.cpp's imatrix)
/// the error is weighted by `importance · √(σ² + x²)`, else by `x²`.
pub fn quantize_row(kind: IQuant, row: &[f32], importance: Option<&[f32]>, out: &mut [u8]) {
    let (n, size) = (kind.block_size(), kind.type_size());
    assert_eq!(row.len() % n, 0, "a row of whole blocks");
    assert_eq!(out.len(), kind.row_bytes(row.len()), "the row's bytes");
    for (b, (x, block)) in row.chunks(n).zip(out.chunks_mut(size)).enumerate() {
        let qw = importance.map(|w| &w[b * n..(b + 1) * n]);
        match kind {
            IQuant::IQ4NL | IQuant::IQ4XS => quantize_iq4(x, qw, block, kind),
            IQuant::IQ3XXS | IQuant::IQ3S => iq3::quantize_block(kind, x, qw, block),
            IQuant::IQ2XXS | IQuant::IQ2XS | IQuant::IQ2S => {
                iq2::quantize_block(kind, x, qw, block)
            }
        }
    }
}

/// ggml's `best_index_int8`: the index of the codebook value nearest `x` (ties to the upper one).
pub(crate) fn best_index(values: &[i8; 16], x: f32) -> u8 {
    if x <= values[0] as f32 {
        return 0;
    }
    if x >= values[15] as f32 {
        return 15;
    }
    let (mut ml, mut mu) = (0usize, 15usize);
    while mu - ml > 1 {
        let mav = (ml + mu) / 2;
        if x < values[mav] as f32 {
            mu = mav;
        } else {
            ml = mav;
        }
    }
    if x - (values[mu - 1] as f32) < values[mu] as f32 - x {
        (mu - 1) as u8
    } else {
        mu as u8
    }
}

/// ggml's `nearest_int`: round half to even through the f32 mantissa.
fn nearest_int(x: f32) -> i32 {
    let bits = (x + 12_582_912.0).to_bits() as i32;
    (bits & 0x007f_ffff) - 0x0040_0000
}

/// Σ w·q·x and Σ w·q² of a sub-block at inverse scale `id`, the indices written to `l`.
fn fit(x: &[f32], weight: &[f32], id: f32, l: &mut [u8]) -> (f32, f32) {
    let (mut sumqx, mut sumq2) = (0f32, 0f32);
    for ((&x, &w), l) in x.iter().zip(weight).zip(l) {
        *l = best_index(&KVALUES_IQ4NL, id * x);
        let q = KVALUES_IQ4NL[*l as usize] as f32;
        sumqx += w * q * x;
        sumq2 += w * q * q;
    }
    (sumqx, sumq2)
}

/// ggml's `quantize_row_iq4_nl_impl` with `ntry = 7` (what `quantize_iq4_nl` / `quantize_iq4_xs`
/// pass) for one block of `kind`.
fn quantize_iq4(x: &[f32], qw: Option<&[f32]>, out: &mut [u8], kind: IQuant) {
    let values = &KVALUES_IQ4NL;
    let ntry = 7i32;
    let n = x.len();
    let mut sigma2 = 0f32;
    for &v in x {
        sigma2 += v * v;
    }
    sigma2 *= 2.0 / n as f32;
    let subs = n / 32;
    let mut scales = [0f32; 8];
    let mut l = [0u8; 256];
    let mut weight = [0f32; 32];
    let mut scratch = [0u8; 32];
    let (mut max_scale, mut amax_scale) = (0f32, 0f32);
    for ib in 0..subs {
        let xb = &x[ib * 32..(ib + 1) * 32];
        for (j, w) in weight.iter_mut().enumerate() {
            *w = match qw {
                Some(qw) => qw[ib * 32 + j] * (sigma2 + xb[j] * xb[j]).sqrt(),
                None => xb[j] * xb[j],
            };
        }
        let (mut amax, mut max) = (0f32, 0f32);
        for &v in xb {
            if v.abs() > amax {
                (amax, max) = (v.abs(), v);
            }
        }
        if amax < GROUP_MAX_EPS {
            scales[ib] = 0.0;
            continue;
        }
        let first = values[0] as f32;
        let id = 1.0 / (-max / first);
        let (sumqx, sumq2) = fit(xb, &weight, id, &mut l[ib * 32..(ib + 1) * 32]);
        let mut d = if sumq2 > 0.0 { sumqx / sumq2 } else { 0.0 };
        let mut best = d * sumqx;
        for itry in -ntry..=ntry {
            let id = (itry + values[0] as i32) as f32 / max;
            let (sumqx, sumq2) = fit(xb, &weight, id, &mut scratch);
            if sumq2 > 0.0 && sumqx * sumqx > best * sumq2 {
                d = sumqx / sumq2;
                best = d * sumqx;
            }
        }
        scales[ib] = d;
        if d.abs() > amax_scale {
            (amax_scale, max_scale) = (d.abs(), d);
        }
    }
    out.fill(0);
    let qs_at = indices_at(kind);
    match kind {
        IQuant::IQ4NL => {
            out[..2].copy_from_slice(&f16::from_f32(scales[0]).to_le_bytes());
            let id = if scales[0] != 0.0 {
                1.0 / scales[0]
            } else {
                0.0
            };
            for (l, &v) in l.iter_mut().zip(x) {
                *l = best_index(values, id * v);
            }
        }
        _ => {
            let d = -max_scale / 32.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let mut ls = [0i32; 8];
            for ib in 0..subs {
                ls[ib] = nearest_int(id * scales[ib]).clamp(-32, 31);
                let dl = d * ls[ib] as f32;
                let idl = if dl != 0.0 { 1.0 / dl } else { 0.0 };
                for j in 0..32 {
                    l[ib * 32 + j] = best_index(values, idl * x[ib * 32 + j]);
                }
            }
            write_iq4xs_scales(out, f16::from_f32(d), &ls);
        }
    }
    pack_indices(&mut out[qs_at..], &l[..n]);
}

/// Where a block's 4-bit indices start (IQ4_NL, IQ4_XS).
fn indices_at(kind: IQuant) -> usize {
    match kind {
        IQuant::IQ4NL => 2,
        _ => 8,
    }
}

/// Packs 4-bit indices, 32 per sub-block: byte j holds index j (low nibble) and j + 16.
fn pack_indices(qs: &mut [u8], l: &[u8]) {
    for (q, l) in qs.chunks_mut(16).zip(l.chunks(32)) {
        for j in 0..16 {
            q[j] = l[j] | l[16 + j] << 4;
        }
    }
}

/// An IQ4_XS block's super-block scale `d` and its eight signed 6-bit sub-block scales: the
/// sub-block of 32 weights decodes as `d·ls` times the codebook values.
pub fn iq4xs_scales(block: &[u8]) -> (f16, [i32; 8]) {
    let scales_h = u16::from_le_bytes([block[2], block[3]]);
    let ls = std::array::from_fn(|ib| {
        let low = (block[4 + ib / 2] >> (4 * (ib % 2))) & 0xf;
        let high = ((scales_h >> (2 * ib)) & 3) as u8;
        (low | high << 4) as i32 - 32
    });
    (f16::from_le_bytes([block[0], block[1]]), ls)
}

/// Writes an IQ4_XS block's scales (the inverse of [`iq4xs_scales`]; each `ls` in −32..=31),
/// keeping its indices.
pub fn write_iq4xs_scales(block: &mut [u8], d: f16, ls: &[i32; 8]) {
    block[..2].copy_from_slice(&d.to_le_bytes());
    block[4..8].fill(0);
    let mut scales_h = 0u16;
    for (ib, &l) in ls.iter().enumerate() {
        debug_assert!((-32..=31).contains(&l), "{l}");
        let l = (l + 32) as u8;
        block[4 + ib / 2] |= (l & 0xf) << (4 * (ib % 2));
        scales_h |= ((l >> 4) as u16) << (2 * ib);
    }
    block[2..4].copy_from_slice(&scales_h.to_le_bytes());
}

/// The scale of each 32-weight sub-block of a block as stored (what dequantization multiplies
/// the codebook values by); none for the grid types ([`octet_scales`]).
pub fn sub_scales(kind: IQuant, block: &[u8]) -> Vec<f32> {
    let d = f16::from_le_bytes([block[0], block[1]]).to_f32();
    match kind {
        IQuant::IQ4NL => vec![d],
        IQuant::IQ4XS => {
            let (d, ls) = iq4xs_scales(block);
            ls.iter().map(|&l| d.to_f32() * l as f32).collect()
        }
        IQuant::IQ3XXS | IQuant::IQ3S | IQuant::IQ2XXS | IQuant::IQ2XS | IQuant::IQ2S => vec![],
    }
}

/// The codebook index whose value under sub-block scale `d` is nearest `x`, and that value.
pub fn nearest(d: f32, x: f32) -> (u8, f32) {
    if d == 0.0 {
        return (best_index(&KVALUES_IQ4NL, 0.0), 0.0);
    }
    let i = best_index(&KVALUES_IQ4NL, x / d);
    (i, d * KVALUES_IQ4NL[i as usize] as f32)
}

/// Writes a block's indices (one per weight, in order), keeping its scales.
pub fn write_indices(kind: IQuant, block: &mut [u8], l: &[u8]) {
    debug_assert_eq!(l.len(), kind.block_size());
    pack_indices(&mut block[indices_at(kind)..], l);
}

#[cfg(test)]
mod tests;
