//! Codes inside the grid types' blocks (IQ3_XXS, IQ3_S, IQ2_XXS, IQ2_XS, IQ2_S), chosen eight
//! weights at a time under scales that are already fixed: what GPTQ needs where one code stands
//! for several weights.
//!
//! Eight weights share one grid point of eight magnitudes (the IQ2 types) or two of four (the
//! IQ3 types) and their signs: all eight stored (the S types), or seven, the eighth making the
//! count of minus signs even (XXS, XS). For a given point the best signs are the weights' own,
//! except that an odd count of negative weights must flip the one sign that costs least;
//! [`nearest_octet`] minimizes the weighted error over every point exactly that way, so it finds
//! the best code of the eight, not a neighbour of it.

use shrink_core::iquant::tables::{IQ2S_GRID, IQ2XS_GRID, IQ2XXS_GRID, IQ3S_GRID, IQ3XXS_GRID};
use shrink_core::iquant::IQuant;
use std::sync::OnceLock;

/// Weights per code: eight (one sign group).
pub const OCTET: usize = 8;

/// The grid's points as the dequantizer's magnitudes (points of eight for IQ2, of four for IQ3).
fn points(kind: IQuant) -> &'static [Vec<f32>] {
    static GRIDS: [OnceLock<Vec<Vec<f32>>>; 5] = [const { OnceLock::new() }; 5];
    let bytes = |p: u64, n: usize| (0..n).map(|j| (p >> (8 * j)) as u8 as f32).collect();
    let of = |table: &[u64], n: usize| table.iter().map(|&p| bytes(p, n)).collect();
    let wide = |table: &[u32]| table.iter().map(|&p| bytes(p as u64, 4)).collect();
    match kind {
        IQuant::IQ2XXS => GRIDS[0].get_or_init(|| of(&IQ2XXS_GRID, 8)),
        IQuant::IQ2XS => GRIDS[1].get_or_init(|| of(&IQ2XS_GRID, 8)),
        IQuant::IQ2S => GRIDS[2].get_or_init(|| of(&IQ2S_GRID, 8)),
        IQuant::IQ3XXS => GRIDS[3].get_or_init(|| wide(&IQ3XXS_GRID)),
        IQuant::IQ3S => GRIDS[4].get_or_init(|| wide(&IQ3S_GRID)),
        IQuant::IQ4NL | IQuant::IQ4XS => panic!("{} has a code per weight", kind.name()),
    }
}

/// Whether `kind` stores a code per eight weights (grid points and signs).
pub fn is_grid(kind: IQuant) -> bool {
    !matches!(kind, IQuant::IQ4NL | IQuant::IQ4XS)
}

/// Whether the eighth sign of a group follows from the other seven (even parity).
fn parity(kind: IQuant) -> bool {
    matches!(kind, IQuant::IQ3XXS | IQuant::IQ2XXS | IQuant::IQ2XS)
}

/// The scale each group of eight weights of one block is dequantized with (ggml's `db`).
pub fn octet_scales(kind: IQuant, block: &[u8]) -> Vec<f32> {
    let d = half::f16::from_le_bytes([block[0], block[1]]).to_f32();
    let word = |at: usize| u32::from_le_bytes(block[at..at + 4].try_into().unwrap());
    let nibble = |at: usize, j: usize| block[at + j / 2] >> (4 * (j % 2)) & 0xf;
    (0..32)
        .map(|k| match kind {
            IQuant::IQ3XXS => d * (0.5 + (word(66 + 4 * (k / 4)) >> 28) as f32) * 0.5,
            IQuant::IQ3S => d * (1 + 2 * nibble(106, k / 4) as i32) as f32,
            IQuant::IQ2XXS => d * (0.5 + (word(6 + 8 * (k / 4)) >> 28) as f32) * 0.25,
            IQuant::IQ2XS => d * (0.5 + nibble(66, k / 2) as f32) * 0.25,
            IQuant::IQ2S => d * (0.5 + nibble(74, k / 2) as f32) * 0.25,
            IQuant::IQ4NL | IQuant::IQ4XS => panic!("{} has a code per weight", kind.name()),
        })
        .collect()
}

/// A grid point and its weighted error.
struct Best {
    index: usize,
    cost: f32,
}

/// The point of `grid` (magnitudes at scale `db`) nearest `a = |x|` in the `w`-weighted error with
/// the weights' own signs, or (`flip`) with the cheapest one of them flipped, and that coordinate.
fn scan(grid: &[Vec<f32>], db: f32, a: &[f32], w: &[f32], flip: bool) -> (Best, usize) {
    let mut best = Best {
        index: 0,
        cost: f32::INFINITY,
    };
    let mut best_flip = 0;
    for (index, g) in grid.iter().enumerate() {
        let (mut cost, mut extra, mut at) = (0f32, f32::INFINITY, 0);
        for k in 0..g.len() {
            let m = db * g[k];
            let e = m - a[k];
            cost += w[k] * e * e;
            if flip {
                // (m + a)² − (m − a)² = 4·m·a.
                let f = 4.0 * w[k] * m * a[k];
                if f < extra {
                    (extra, at) = (f, k);
                }
            }
        }
        if flip {
            cost += extra;
        }
        if cost < best.cost {
            (best, best_flip) = (Best { index, cost }, at);
        }
    }
    (best, best_flip)
}

/// The code of eight weights `x` (one or two grid indices of 10 bits and the eight sign bits,
/// `i0 | i1 << 10 | signs << 20`, as [`write_octets`] reads it) whose dequantized values at scale
/// `db` are nearest `x` in the `w`-weighted squared error, and those values (bit for bit the
/// dequantizer's).
pub fn nearest_octet(kind: IQuant, db: f32, x: &[f32], w: &[f32]) -> (u32, [f32; OCTET]) {
    debug_assert_eq!((x.len(), w.len()), (OCTET, OCTET));
    let grid = points(kind);
    let a: Vec<f32> = x.iter().map(|v| v.abs()).collect();
    let mut signs = x
        .iter()
        .enumerate()
        .fold(0u8, |s, (k, &v)| s | ((v < 0.0) as u8) << k);
    let odd = parity(kind) && signs.count_ones() % 2 == 1;
    let (indices, flip) = if grid[0].len() == OCTET {
        let (best, at) = scan(grid, db, &a, w, odd);
        (vec![best.index], at)
    } else {
        // Two points of four share the signs: the flip goes to one half or the other.
        let free: Vec<Best> = (0..2)
            .map(|h| scan(grid, db, &a[4 * h..4 * h + 4], &w[4 * h..4 * h + 4], false).0)
            .collect();
        if odd {
            let flipped: Vec<(Best, usize)> = (0..2)
                .map(|h| scan(grid, db, &a[4 * h..4 * h + 4], &w[4 * h..4 * h + 4], true))
                .collect();
            let first = flipped[0].0.cost + free[1].cost;
            let second = free[0].cost + flipped[1].0.cost;
            if first <= second {
                (vec![flipped[0].0.index, free[1].index], flipped[0].1)
            } else {
                (vec![free[0].index, flipped[1].0.index], 4 + flipped[1].1)
            }
        } else {
            (free.iter().map(|b| b.index).collect(), 0)
        }
    };
    if odd {
        signs ^= 1 << flip;
    }
    let mut values = [0f32; OCTET];
    let per = OCTET / indices.len();
    for (k, v) in values.iter_mut().enumerate() {
        let m = db * grid[indices[k / per]][k % per];
        *v = if signs >> k & 1 == 1 { -m } else { m };
    }
    let second = indices.get(1).copied().unwrap_or(0) as u32;
    (
        indices[0] as u32 | second << 10 | (signs as u32) << 20,
        values,
    )
}

/// Writes one block's 32 octet codes (from [`nearest_octet`]), keeping its scales.
pub fn write_octets(kind: IQuant, block: &mut [u8], codes: &[u32]) {
    debug_assert_eq!(codes.len(), 32);
    let set_bits = |block: &mut [u8], at: usize, shift: usize, width: u32, value: u32| {
        let mut w = u32::from_le_bytes(block[at..at + 4].try_into().unwrap());
        let mask = ((1u32 << width) - 1) << shift;
        w = w & !mask | (value << shift) & mask;
        block[at..at + 4].copy_from_slice(&w.to_le_bytes());
    };
    for (k, &c) in codes.iter().enumerate() {
        let (i0, i1, signs) = (c & 1023, (c >> 10) & 1023, (c >> 20) & 255);
        let (ib, l) = (k / 4, k % 4);
        match kind {
            IQuant::IQ3XXS => {
                block[2 + 8 * ib + 2 * l] = i0 as u8;
                block[3 + 8 * ib + 2 * l] = i1 as u8;
                set_bits(block, 66 + 4 * ib, 7 * l, 7, signs);
            }
            IQuant::IQ3S => {
                block[2 + 8 * ib + 2 * l] = i0 as u8;
                block[3 + 8 * ib + 2 * l] = i1 as u8;
                let high = (i0 >> 8 | (i1 >> 8) << 1) as u8;
                block[66 + ib] = block[66 + ib] & !(3 << (2 * l)) | high << (2 * l);
                block[74 + k] = signs as u8;
            }
            IQuant::IQ2XXS => {
                block[2 + 8 * ib + l] = i0 as u8;
                set_bits(block, 6 + 8 * ib, 7 * l, 7, signs);
            }
            IQuant::IQ2XS => {
                let word = (i0 | (signs & 127) << 9) as u16;
                block[2 + 2 * k..4 + 2 * k].copy_from_slice(&word.to_le_bytes());
            }
            IQuant::IQ2S => {
                block[2 + k] = i0 as u8;
                let q = &mut block[66 + ib];
                *q = *q & !(3 << (2 * l)) | ((i0 >> 8) as u8) << (2 * l);
                block[34 + k] = signs as u8;
            }
            IQuant::IQ4NL | IQuant::IQ4XS => panic!("{} has a code per weight", kind.name()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use shrink_core::iquant::tables::KSIGNS_IQ2XS;

    /// Every code of eight weights by brute force: each point (pair of points) and each of the
    /// 128 sign patterns of even parity; with free signs each group of a point's size alone,
    /// every point and every sign pattern.
    fn brute(kind: IQuant, db: f32, x: &[f32], w: &[f32]) -> f32 {
        let grid = points(kind);
        let d = grid[0].len();
        if !parity(kind) {
            return (0..8 / d)
                .map(|h| {
                    let mut best = f32::INFINITY;
                    for g in grid {
                        for s in 0..1u32 << d {
                            let c: f32 = (0..d)
                                .map(|j| {
                                    let m = db * g[j] * if s >> j & 1 == 1 { -1.0 } else { 1.0 };
                                    w[h * d + j] * (m - x[h * d + j]).powi(2)
                                })
                                .sum();
                            best = best.min(c);
                        }
                    }
                    best
                })
                .sum();
        }
        let cost = |vals: &dyn Fn(usize) -> f32| -> f32 {
            (0..8).map(|k| w[k] * (vals(k) - x[k]).powi(2)).sum()
        };
        let mut best = f32::INFINITY;
        let n = grid.len();
        let pairs: Vec<Vec<usize>> = if d == 8 {
            (0..n).map(|i| vec![i]).collect()
        } else {
            (0..n)
                .flat_map(|i| (0..n).map(move |j| vec![i, j]))
                .collect()
        };
        for p in &pairs {
            let per = 8 / p.len();
            // Per coordinate the cost of + and of −: the even patterns' best by enumeration.
            for &s in &KSIGNS_IQ2XS {
                let c = cost(&|k| {
                    let m = db * grid[p[k / per]][k % per];
                    if s >> k & 1 == 1 {
                        -m
                    } else {
                        m
                    }
                });
                best = best.min(c);
            }
        }
        best
    }

    #[test]
    fn nearest_octet_is_the_best_of_every_code() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(4);
        for (kind, cases) in [
            (IQuant::IQ2XXS, 40),
            (IQuant::IQ2XS, 40),
            (IQuant::IQ2S, 20),
            (IQuant::IQ3XXS, 3),
            (IQuant::IQ3S, 20),
        ] {
            for _ in 0..cases {
                let db: f32 = rng.gen_range(0.001..0.01);
                let x: Vec<f32> = (0..8).map(|_| rng.gen_range(-0.3..0.3)).collect();
                let w: Vec<f32> = (0..8).map(|_| rng.gen_range(0.1..2.0)).collect();
                let (_, v) = nearest_octet(kind, db, &x, &w);
                let got: f32 = (0..8).map(|k| w[k] * (v[k] - x[k]).powi(2)).sum();
                let want = brute(kind, db, &x, &w);
                assert!(got <= want * (1.0 + 1e-5), "{kind:?}: {got} vs {want}");
            }
        }
    }

    #[test]
    fn written_octets_dequantize_to_the_chosen_values_and_keep_the_scales() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(8);
        for kind in IQuant::ALL.into_iter().filter(|&k| is_grid(k)) {
            let row: Vec<f32> = (0..256).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let mut block = vec![0u8; kind.type_size()];
            super::super::quantize_row(kind, &row, None, &mut block);
            let scales = octet_scales(kind, &block);
            // Targets away from the block's own codes: other weights under the same scales.
            let target: Vec<f32> = (0..256).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let mut want = vec![0f32; 256];
            let codes: Vec<u32> = (0..32)
                .map(|k| {
                    let r = 8 * k..8 * k + 8;
                    let (c, v) = nearest_octet(kind, scales[k], &target[r.clone()], &[1.0; 8]);
                    want[r].copy_from_slice(&v);
                    c
                })
                .collect();
            let before = block.clone();
            write_octets(kind, &mut block, &codes);
            assert_ne!(block, before, "{kind:?}: new codes");
            assert_eq!(octet_scales(kind, &block), scales, "{kind:?}");
            let mut got = vec![0f32; 256];
            kind.dequantize_row(&block, &mut got);
            assert_eq!(got, want, "{kind:?}");
        }
    }
}
