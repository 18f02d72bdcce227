//! ggml's IQ3_XXS quantizer (`quantize_row_iq3_xxs_impl` with its grid of 256 points): each
//! sub-block of 32 weights is eight groups of four magnitudes, each group a point of the grid
//! (or, off the grid, its best neighbour among the nearest points), with signs stored as seven
//! bits per eight weights (an even count of minus signs; the least important weight gives way),
//! a scale searched over 31 trial steps and stored in 4 bits under the block's f16 scale.

use super::nearest_int;
use half::f16;
use shrink_core::iquant::tables::IQ3XXS_GRID;
use std::sync::OnceLock;

/// Magnitudes per grid coordinate: 2l + 1 for l in 0..8.
const K_MAX_Q: i32 = 8;
/// ggml's `GROUP_MAX_EPS_IQ3_XXS`.
const GROUP_MAX_EPS: f32 = 1e-8;

/// The grid as ggml's `iq3xs_init_impl(256)` builds it: points (coordinates 2l + 1), the map
/// from a 12-bit point code (3 bits per coordinate) to its index, and for every code off the
/// grid the indices of the grid points at the two smallest distances.
struct Grid {
    points: [[i8; 4]; 256],
    map: Vec<i32>,
    neighbours: Vec<Vec<u16>>,
}

fn grid() -> &'static Grid {
    static GRID: OnceLock<Grid> = OnceLock::new();
    GRID.get_or_init(|| {
        // The dequantizer's table holds 4·(2l + 1) per byte.
        let mut points = [[0i8; 4]; 256];
        for (p, &g) in points.iter_mut().zip(IQ3XXS_GRID.iter()) {
            for (i, v) in p.iter_mut().enumerate() {
                *v = ((g >> (8 * i)) & 0xff) as i8 / 4;
            }
        }
        let code = |p: &[i8; 4]| -> usize {
            p.iter()
                .enumerate()
                .map(|(k, &v)| (((v - 1) / 2) as usize) << (3 * k))
                .sum()
        };
        let mut map = vec![-1i32; 4096];
        for (i, p) in points.iter().enumerate() {
            map[code(p)] = i as i32;
        }
        let nwant = 2;
        let neighbours = (0..4096usize)
            .map(|u| {
                if map[u] >= 0 {
                    return vec![];
                }
                let pos: [i32; 4] = std::array::from_fn(|k| 2 * ((u >> (3 * k)) & 7) as i32 + 1);
                let mut dist: Vec<(i32, usize)> = points
                    .iter()
                    .enumerate()
                    .map(|(j, p)| {
                        let d2 = (0..4).map(|k| (p[k] as i32 - pos[k]).pow(2)).sum();
                        (d2, j)
                    })
                    .collect();
                dist.sort_unstable();
                let (mut d2, mut nhave, mut out) = (dist[0].0, 1, vec![]);
                for &(d, j) in &dist {
                    if d > d2 {
                        if nhave == nwant {
                            break;
                        }
                        d2 = d;
                        nhave += 1;
                    }
                    out.push(j as u16);
                }
                out
            })
            .collect();
        Grid {
            points,
            map,
            neighbours,
        }
    })
}

/// ggml's `iq3_find_best_neighbour`: among the neighbours of an off-grid code, the point whose
/// values at `scale` are nearest `xval` in the `weight`-ed norm; its coordinates go to `l`.
fn best_neighbour(
    g: &Grid,
    code: usize,
    xval: &[f32],
    weight: &[f32],
    scale: f32,
    l: &mut [i8],
) -> usize {
    let (mut best_d2, mut best) = (f32::MAX, 0usize);
    for &j in &g.neighbours[code] {
        let p = &g.points[j as usize];
        let mut d2 = 0f32;
        for i in 0..4 {
            let diff = scale * p[i] as f32 - xval[i];
            d2 += weight[i] * diff * diff;
        }
        if d2 < best_d2 {
            (best_d2, best) = (d2, j as usize);
        }
    }
    for (l, &p) in l.iter_mut().zip(&g.points[best]) {
        *l = (p - 1) / 2;
    }
    best
}

/// The 12-bit code of four coordinates.
fn code_of(l: &[i8]) -> usize {
    l.iter()
        .enumerate()
        .map(|(i, &v)| (v as usize) << (3 * i))
        .sum()
}

/// Σ w·x·q and Σ w·q² with q = 2l + 1.
fn sums(weight: &[f32], xval: &[f32], l: &[i8]) -> (f32, f32) {
    let (mut sumqx, mut sumq2) = (0f32, 0f32);
    for i in 0..32 {
        let (w, q) = (weight[i], (2 * l[i] as i32 + 1) as f32);
        sumqx += w * xval[i] * q;
        sumq2 += w * q * q;
    }
    (sumqx, sumq2)
}

/// One block of 256 weights into its 98 bytes.
pub(super) fn quantize_block(x: &[f32], qw: Option<&[f32]>, out: &mut [u8]) {
    let g = grid();
    out.fill(0);
    let mut q3 = [0u8; 96];
    let mut scales = [0f32; 8];
    let mut max_scale = 0f32;
    let mut sumx2 = 0f32;
    for &v in x {
        sumx2 += v * v;
    }
    let sigma2 = 2.0 * sumx2 / 256.0;
    let (mut weight, mut waux, mut xval) = ([0f32; 32], [0f32; 32], [0f32; 32]);
    for ib in 0..8 {
        let xb = &x[32 * ib..32 * ib + 32];
        for i in 0..32 {
            weight[i] = match qw {
                Some(qw) => qw[32 * ib + i] * (sigma2 + xb[i] * xb[i]).sqrt(),
                None => xb[i] * xb[i],
            };
            waux[i] = weight[i].sqrt();
        }
        let mut block_signs = [0u8; 4];
        for k in 0..4 {
            let (mut nflip, mut s) = (0, 0u8);
            for i in 0..8 {
                let v = xb[8 * k + i];
                if v >= 0.0 {
                    xval[8 * k + i] = v;
                } else {
                    xval[8 * k + i] = -v;
                    nflip += 1;
                    s |= 1 << i;
                }
            }
            if nflip % 2 == 1 {
                let at = |i: usize| weight[8 * k + i] * xb[8 * k + i] * xb[8 * k + i];
                let (mut imin, mut min) = (0, at(0));
                for i in 1..8 {
                    if at(i) < min {
                        (min, imin) = (at(i), i);
                    }
                }
                xval[8 * k + imin] = -xval[8 * k + imin];
                s ^= 1 << imin;
            }
            block_signs[k] = s & 127;
        }
        let mut max = xval[0];
        for &v in &xval[1..] {
            max = max.max(v);
        }
        let mut l = [0i8; 32];
        if max < GROUP_MAX_EPS {
            scales[ib] = 0.0;
            continue;
        }
        let mut best = 0f32;
        let mut scale = max / (2 * K_MAX_Q - 1) as f32;
        let mut on_grid = [true; 8];
        let mut laux = [0i8; 32];
        let mut on_grid_aux = [true; 8];
        for is in -15..=15 {
            let id = ((2 * K_MAX_Q - 1) as f32 + is as f32 * 0.2) / max;
            let this_scale = 1.0 / id;
            for k in 0..8 {
                for i in 0..4 {
                    let v = nearest_int(0.5 * (id * xval[4 * k + i] - 1.0));
                    laux[4 * k + i] = v.clamp(0, K_MAX_Q - 1) as i8;
                }
                let u = code_of(&laux[4 * k..4 * k + 4]);
                on_grid_aux[k] = g.map[u] >= 0;
                if !on_grid_aux[k] {
                    best_neighbour(
                        g,
                        u,
                        &xval[4 * k..4 * k + 4],
                        &waux[4 * k..4 * k + 4],
                        this_scale,
                        &mut laux[4 * k..4 * k + 4],
                    );
                }
            }
            let (sumqx, sumq2) = sums(&weight, &xval, &laux);
            if sumq2 > 0.0 && sumqx * sumqx > best * sumq2 {
                scale = sumqx / sumq2;
                best = scale * sumqx;
                l = laux;
                on_grid = on_grid_aux;
            }
        }
        if on_grid.iter().any(|&b| !b) && scale > 0.0 {
            let id = 1.0 / scale;
            for k in 0..8 {
                if on_grid[k] {
                    continue;
                }
                let mut u = 0usize;
                for i in 0..4 {
                    let v = nearest_int(0.5 * (id * xval[4 * k + i] - 1.0)).clamp(0, K_MAX_Q - 1);
                    u |= (v as usize) << (3 * i);
                }
                let index = match g.map[u] {
                    i if i >= 0 => i as usize,
                    _ => best_neighbour(
                        g,
                        u,
                        &xval[4 * k..4 * k + 4],
                        &waux[4 * k..4 * k + 4],
                        scale,
                        &mut l[4 * k..4 * k + 4],
                    ),
                };
                for i in 0..4 {
                    l[4 * k + i] = (g.points[index][i] - 1) / 2;
                }
            }
            let (sumqx, sumq2) = sums(&weight, &xval, &l);
            if sumq2 > 0.0 {
                scale = sumqx / sumq2;
            }
        }
        if scale < 0.0 {
            // ggml's guard (never expected): a positive scale and every sign flipped.
            scale = -scale;
            block_signs.iter_mut().for_each(|s| *s = !*s & 127);
        }
        for k in 0..8 {
            // Every group is on the grid now (ggml aborts otherwise; the map is total here).
            q3[8 * ib + k] = g.map[code_of(&l[4 * k..4 * k + 4])].max(0) as u8;
        }
        let signs = block_signs[0] as u32
            | (block_signs[1] as u32) << 7
            | (block_signs[2] as u32) << 14
            | (block_signs[3] as u32) << 21;
        q3[64 + 4 * ib..68 + 4 * ib].copy_from_slice(&signs.to_le_bytes());
        scales[ib] = scale;
        max_scale = max_scale.max(scale);
    }
    if max_scale == 0.0 {
        return;
    }
    let d = max_scale / 31.0;
    out[..2].copy_from_slice(&f16::from_f32(d * 1.0125).to_le_bytes());
    let id = 1.0 / d;
    for (ib, &s) in scales.iter().enumerate() {
        let l = nearest_int(0.5 * (id * s - 1.0)).clamp(0, 15) as u32;
        let at = 64 + 4 * ib;
        let word = u32::from_le_bytes(q3[at..at + 4].try_into().unwrap_or_default()) | l << 28;
        q3[at..at + 4].copy_from_slice(&word.to_le_bytes());
    }
    out[2..].copy_from_slice(&q3);
}
