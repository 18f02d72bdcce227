//! Codes inside the grid types' blocks (IQ3_XXS, IQ2_XS), chosen eight weights at a time under
//! scales that are already fixed: what GPTQ needs where one code stands for several weights.
//!
//! Eight weights share seven stored sign bits (the eighth makes the count of minus signs even)
//! and one grid point of eight magnitudes (IQ2_XS) or two of four (IQ3_XXS). For a given point
//! the best signs are the weights' own, except that an odd count of negative weights must flip
//! the one sign that costs least; [`nearest_octet`] minimizes the weighted error over every
//! point exactly that way, so it finds the best code of the eight, not a neighbour of it.

use shrink_core::iquant::tables::{IQ2XS_GRID, IQ3XXS_GRID};
use shrink_core::iquant::IQuant;
use std::sync::OnceLock;

/// Weights per code: eight (one sign group).
pub const OCTET: usize = 8;

/// The grid's points as the dequantizer's magnitudes: IQ2_XS's 512 points of eight and IQ3_XXS's
/// 256 points of four.
fn points(kind: IQuant) -> &'static [Vec<f32>] {
    static IQ2: OnceLock<Vec<Vec<f32>>> = OnceLock::new();
    static IQ3: OnceLock<Vec<Vec<f32>>> = OnceLock::new();
    let bytes = |p: u64, n: usize| (0..n).map(|j| (p >> (8 * j)) as u8 as f32).collect();
    match kind {
        IQuant::IQ2XS => IQ2.get_or_init(|| IQ2XS_GRID.iter().map(|&p| bytes(p, 8)).collect()),
        IQuant::IQ3XXS => {
            IQ3.get_or_init(|| IQ3XXS_GRID.iter().map(|&p| bytes(p as u64, 4)).collect())
        }
        IQuant::IQ4NL | IQuant::IQ4XS => panic!("{} has a code per weight", kind.name()),
    }
}

/// Whether `kind` stores a code per eight weights (a grid point and seven signs).
pub fn is_grid(kind: IQuant) -> bool {
    matches!(kind, IQuant::IQ3XXS | IQuant::IQ2XS)
}

/// The scale each group of eight weights of one block is dequantized with (ggml's `db`).
pub fn octet_scales(kind: IQuant, block: &[u8]) -> Vec<f32> {
    let d = half::f16::from_le_bytes([block[0], block[1]]).to_f32();
    match kind {
        IQuant::IQ3XXS => (0..32)
            .map(|k| {
                let ib = k / 4;
                let aux = u32::from_le_bytes(block[66 + 4 * ib..70 + 4 * ib].try_into().unwrap());
                d * (0.5 + (aux >> 28) as f32) * 0.5
            })
            .collect(),
        IQuant::IQ2XS => (0..32)
            .map(|k| {
                let s = block[66 + k / 4] >> (4 * (k % 4 / 2)) & 0xf;
                d * (0.5 + s as f32) * 0.25
            })
            .collect(),
        IQuant::IQ4NL | IQuant::IQ4XS => panic!("{} has a code per weight", kind.name()),
    }
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

/// The code of eight weights `x` (grid index or indices and the seven stored sign bits, packed as
/// [`write_octets`] reads them) whose dequantized values at scale `db` are nearest `x` in the
/// `w`-weighted squared error, and those values (bit for bit the dequantizer's).
pub fn nearest_octet(kind: IQuant, db: f32, x: &[f32], w: &[f32]) -> (u32, [f32; OCTET]) {
    debug_assert_eq!((x.len(), w.len()), (OCTET, OCTET));
    let grid = points(kind);
    let a: Vec<f32> = x.iter().map(|v| v.abs()).collect();
    let mut signs = x
        .iter()
        .enumerate()
        .fold(0u8, |s, (k, &v)| s | ((v < 0.0) as u8) << k);
    let odd = signs.count_ones() % 2 == 1;
    let (indices, flip) = match kind {
        IQuant::IQ2XS => {
            let (best, at) = scan(grid, db, &a, w, odd);
            (vec![best.index], at)
        }
        _ => {
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
    let code = match kind {
        IQuant::IQ2XS => indices[0] as u32 | ((signs & 127) as u32) << 9,
        _ => indices[0] as u32 | (indices[1] as u32) << 8 | ((signs & 127) as u32) << 16,
    };
    (code, values)
}

/// Writes one block's 32 octet codes (from [`nearest_octet`]), keeping its scales.
pub fn write_octets(kind: IQuant, block: &mut [u8], codes: &[u32]) {
    debug_assert_eq!(codes.len(), 32);
    match kind {
        IQuant::IQ2XS => {
            for (k, &c) in codes.iter().enumerate() {
                block[2 + 2 * k..4 + 2 * k].copy_from_slice(&(c as u16).to_le_bytes());
            }
        }
        _ => {
            for (k, &c) in codes.iter().enumerate() {
                let (ib, l) = (k / 4, k % 4);
                block[2 + 8 * ib + 2 * l] = c as u8;
                block[2 + 8 * ib + 2 * l + 1] = (c >> 8) as u8;
                let at = 66 + 4 * ib;
                let mut aux = u32::from_le_bytes(block[at..at + 4].try_into().unwrap());
                aux = aux & !(127 << (7 * l)) | ((c >> 16) & 127) << (7 * l);
                block[at..at + 4].copy_from_slice(&aux.to_le_bytes());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use shrink_core::iquant::tables::KSIGNS_IQ2XS;

    /// Every code of eight weights by brute force: each point (pair of points) and each of the
    /// 128 sign patterns of even parity.
    fn brute(kind: IQuant, db: f32, x: &[f32], w: &[f32]) -> f32 {
        let grid = points(kind);
        let cost = |vals: &dyn Fn(usize) -> f32| -> f32 {
            (0..8).map(|k| w[k] * (vals(k) - x[k]).powi(2)).sum()
        };
        let mut best = f32::INFINITY;
        let pairs: Vec<Vec<usize>> = match kind {
            IQuant::IQ2XS => (0..512).map(|i| vec![i]).collect(),
            _ => (0..256)
                .flat_map(|i| (0..256).map(move |j| vec![i, j]))
                .collect(),
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
        for (kind, cases) in [(IQuant::IQ2XS, 40), (IQuant::IQ3XXS, 3)] {
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
        for kind in [IQuant::IQ2XS, IQuant::IQ3XXS] {
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
