//! What ggml's grid i-quants share (IQ3_XXS, IQ3_S: points of four 3-bit magnitudes; IQ2_XXS,
//! IQ2_XS, IQ2_S: points of eight 2-bit magnitudes): the grid as `iq3xs_init_impl` /
//! `iq2xs_init_impl` build it (each point's code, and for codes off the grid the points at the
//! nearest distances), the search of a neighbour, and one sub-block's signs, scale search and
//! codes (`quantize_row_iq*_impl`: the same steps with the variations [`Search`] names).

use super::nearest_int;

/// A grid of points of `D` coordinates 2l + 1.
pub(super) struct Grid<const D: usize> {
    points: Vec<[i8; D]>,
    /// Bits of one coordinate's l in a point's code.
    bits: usize,
    /// Code → index of the point, or -1.
    map: Vec<i32>,
    /// Code (off the grid) → the points at the `nwant` smallest distances, by distance then index.
    neighbours: Vec<Vec<u16>>,
}

impl<const D: usize> Grid<D> {
    /// The grid of the dequantizer's table `magnitudes` (one byte per coordinate), whose distinct
    /// byte values in increasing order stand for l = 0, 1, …; codes with an l of `kmax` or more
    /// never occur and get no neighbours.
    pub(super) fn build(table: &[u64], kmax: usize, bits: usize, nwant: usize) -> Self {
        let mut levels: Vec<u8> = table
            .iter()
            .flat_map(|&p| (0..D).map(move |i| (p >> (8 * i)) as u8))
            .collect();
        levels.sort_unstable();
        levels.dedup();
        let points: Vec<[i8; D]> = table
            .iter()
            .map(|&p| {
                std::array::from_fn(|i| {
                    let l = levels.iter().position(|&v| v == (p >> (8 * i)) as u8);
                    2 * l.unwrap_or(0) as i8 + 1
                })
            })
            .collect();
        let mut map = vec![-1i32; 1 << (bits * D)];
        for (i, p) in points.iter().enumerate() {
            let l: [i8; D] = std::array::from_fn(|k| (p[k] - 1) / 2);
            map[code(&l, bits)] = i as i32;
        }
        let neighbours = (0..map.len())
            .map(|u| {
                let pos: [i32; D] =
                    std::array::from_fn(|k| ((u >> (bits * k)) & ((1 << bits) - 1)) as i32);
                if map[u] >= 0 || pos.iter().any(|&l| l as usize >= kmax) {
                    return vec![];
                }
                let mut dist: Vec<(i32, usize)> = points
                    .iter()
                    .enumerate()
                    .map(|(j, p)| {
                        let d2 = (0..D)
                            .map(|k| (p[k] as i32 - (2 * pos[k] + 1)).pow(2))
                            .sum();
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
            bits,
            map,
            neighbours,
        }
    }

    /// The index of the point of `l`, if it is on the grid.
    fn index(&self, l: &[i8]) -> Option<usize> {
        usize::try_from(self.map[code(l, self.bits)]).ok()
    }

    /// ggml's `iq*_find_best_neighbour`: among the neighbours of the off-grid `l`, the point whose
    /// values at `scale` are nearest `xval` in the `weight`-ed norm; its coordinates go to `l`.
    fn best_neighbour(&self, xval: &[f32], weight: &[f32], scale: f32, l: &mut [i8]) -> usize {
        let (mut best_d2, mut best) = (f32::MAX, 0usize);
        for &j in &self.neighbours[code(l, self.bits)] {
            let p = &self.points[j as usize];
            let mut d2 = 0f32;
            for i in 0..D {
                let diff = scale * p[i] as f32 - xval[i];
                d2 += weight[i] * diff * diff;
            }
            if d2 < best_d2 {
                (best_d2, best) = (d2, j as usize);
            }
        }
        for (l, &p) in l.iter_mut().zip(&self.points[best]) {
            *l = (p - 1) / 2;
        }
        best
    }

    /// The grid index of each group of `l` (on the grid by construction).
    fn indices(&self, l: &[i8]) -> Vec<usize> {
        l.chunks(D).map(|g| self.index(g).unwrap_or(0)).collect()
    }
}

fn code(l: &[i8], bits: usize) -> usize {
    l.iter()
        .enumerate()
        .map(|(i, &v)| (v as usize) << (bits * i))
        .sum()
}

/// The constants of a type's sub-block search.
pub(super) struct Search {
    /// Levels of a coordinate (l in 0..kmax).
    pub kmax: i32,
    /// Trial steps `-steps..=steps` of `step` around the largest magnitude's level.
    pub steps: i32,
    pub step: f32,
    /// A sub-block whose largest magnitude is below this is stored as zeros (0: only all zeros).
    pub eps: f32,
    /// Seven sign bits per eight weights, the eighth by an even count of minus signs (the XXS
    /// and XS types), or all eight stored (the S types).
    pub parity: bool,
    /// The trials' reference magnitude: the largest (`false`), or the effective maximum of
    /// ggml's `make_qp_quants` fit (IQ2_XXS).
    pub qp_start: bool,
    /// Which groups the final scale re-rounds.
    pub refit: Refit,
}

/// The re-rounding of a sub-block's groups at its chosen scale, after the trials.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Refit {
    /// Only the groups the best trial put off the grid (IQ3_XXS, IQ2_XS, IQ2_S).
    OffGrid,
    /// Every group, when any was off the grid (IQ3_S).
    AllIfAnyOff,
    /// Every group, always (IQ2_XXS).
    All,
}

/// One sub-block's quantization: per eight weights the sign bits (seven stored, the eighth by
/// parity, or all eight), the scale, and each group's grid index.
pub(super) struct SubBlock {
    pub signs: Vec<u8>,
    pub scale: f32,
    pub indices: Vec<usize>,
}

/// Quantizes sub-block `xb` with error weights `weight`, or `None` for a (near) zero sub-block.
pub(super) fn sub_block<const D: usize>(
    g: &Grid<D>,
    s: &Search,
    xb: &[f32],
    weight: &[f32],
) -> Option<SubBlock> {
    let n = xb.len();
    let waux: Vec<f32> = weight.iter().map(|w| w.sqrt()).collect();
    let mut xval = vec![0f32; n];
    let mut signs = vec![0u8; n / 8];
    for (k, sign) in signs.iter_mut().enumerate() {
        let (mut nflip, mut bits) = (0, 0u8);
        if !s.parity {
            for i in 0..8 {
                let v = xb[8 * k + i];
                xval[8 * k + i] = v.abs();
                bits |= ((v < 0.0) as u8) << i;
            }
            *sign = bits;
            continue;
        }
        for i in 0..8 {
            let v = xb[8 * k + i];
            if v >= 0.0 {
                xval[8 * k + i] = v;
            } else {
                xval[8 * k + i] = -v;
                nflip += 1;
                bits |= 1 << i;
            }
        }
        if nflip % 2 == 1 {
            // An even count of minus signs: the least important weight gives way.
            let at = |i: usize| weight[8 * k + i] * xb[8 * k + i] * xb[8 * k + i];
            let (mut imin, mut min) = (0, at(0));
            for i in 1..8 {
                if at(i) < min {
                    (min, imin) = (at(i), i);
                }
            }
            xval[8 * k + imin] = -xval[8 * k + imin];
            bits ^= 1 << imin;
        }
        *sign = bits & 127;
    }
    let mut max = xval[0];
    for &v in &xval[1..] {
        max = max.max(v);
    }
    if max < s.eps || max == 0.0 {
        return None;
    }
    let groups = n / D;
    let top = (2 * s.kmax - 1) as f32;
    let mut scale = max / top;
    if s.qp_start {
        scale = make_qp_quants(s.kmax + 1, &xval, weight);
        max = scale * s.kmax as f32;
        if max <= 0.0 {
            return None;
        }
    }
    let mut l = vec![0i8; n];
    let mut laux = vec![0i8; n];
    let mut on_grid = vec![s.refit != Refit::AllIfAnyOff; groups];
    let mut on_grid_aux = vec![true; groups];
    let mut best = 0f32;
    let level = |id: f32, x: f32| nearest_int(0.5 * (id * x - 1.0)).clamp(0, s.kmax - 1) as i8;
    for is in -s.steps..=s.steps {
        let id = (top + is as f32 * s.step) / max;
        let this_scale = 1.0 / id;
        let groups = laux.chunks_mut(D).zip(on_grid_aux.iter_mut());
        for ((lg, on), (xg, wg)) in groups.zip(xval.chunks(D).zip(waux.chunks(D))) {
            for (l, &x) in lg.iter_mut().zip(xg) {
                *l = level(id, x);
            }
            *on = g.index(lg).is_some();
            if !*on {
                g.best_neighbour(xg, wg, this_scale, lg);
            }
        }
        let (sumqx, sumq2) = sums(weight, &xval, &laux);
        if sumq2 > 0.0 && sumqx * sumqx > best * sumq2 {
            scale = sumqx / sumq2;
            best = scale * sumqx;
            l.copy_from_slice(&laux);
            on_grid.copy_from_slice(&on_grid_aux);
        }
    }
    let refit = match s.refit {
        Refit::All => true,
        _ => on_grid.iter().any(|&b| !b),
    };
    if refit && scale > 0.0 {
        let id = 1.0 / scale;
        let groups = l.chunks_mut(D).zip(&on_grid);
        for ((lg, _), (xg, wg)) in groups
            .zip(xval.chunks(D).zip(waux.chunks(D)))
            .filter(|((_, &on), _)| !on || s.refit != Refit::OffGrid)
        {
            for (l, &x) in lg.iter_mut().zip(xg) {
                *l = level(id, x);
            }
            if g.index(lg).is_none() {
                g.best_neighbour(xg, wg, scale, lg);
            }
        }
        let (sumqx, sumq2) = sums(weight, &xval, &l);
        if sumq2 > 0.0 {
            scale = sumqx / sumq2;
        }
    }
    if scale < 0.0 {
        // ggml's guard (never expected): a positive scale and every sign flipped.
        scale = -scale;
        let mask = if s.parity { 127 } else { 255 };
        signs.iter_mut().for_each(|b| *b = !*b & mask);
    }
    Some(SubBlock {
        signs,
        scale,
        indices: g.indices(&l),
    })
}

/// A block's stored f16 scale (`max_scale / 31` times ggml's `fudge`) and each sub-block's
/// 4-bit scale under it (`nearest_int(0.5 · (s/d − 1))`), or `None` for a block of zeros.
pub(super) fn block_scales(scales: &[f32], fudge: f32) -> Option<([u8; 2], Vec<u8>)> {
    let max_scale = scales.iter().fold(0f32, |m, &s| m.max(s));
    if max_scale == 0.0 {
        return None;
    }
    let d = max_scale / 31.0;
    let id = 1.0 / d;
    let ls = scales
        .iter()
        .map(|&s| nearest_int(0.5 * (id * s - 1.0)).clamp(0, 15) as u8)
        .collect();
    Some((half::f16::from_f32(d * fudge).to_le_bytes(), ls))
}

/// ggml's `make_qp_quants`: the scale of the best fit of `x` (non-negative) by integers
/// 0..=`nmax` in the `weight`-ed squared error (a scale sweep, then coordinate moves).
fn make_qp_quants(nmax: i32, x: &[f32], weight: &[f32]) -> f32 {
    let mut max = 0f32;
    for &v in x {
        max = max.max(v);
    }
    if max < super::GROUP_MAX_EPS {
        return 0.0;
    }
    let nmaxf = nmax as f32;
    let mse = |iscale: f32, clamp: bool| -> f32 {
        let scale = 1.0 / iscale;
        let mut mse = 0f32;
        for (&v, &w) in x.iter().zip(weight) {
            let mut l = nearest_int(iscale * v);
            if clamp {
                l = l.min(nmax);
            }
            let diff = v - scale * l as f32;
            mse += w * diff * diff;
        }
        mse
    };
    let mut iscale = nmaxf / max;
    let mut best_mse = mse(iscale, false);
    for is in (-4..=4).filter(|&is| is != 0) {
        let iscale_is = (0.1 * is as f32 + nmaxf) / max;
        let m = mse(iscale_is, true);
        if m < best_mse {
            (best_mse, iscale) = (m, iscale_is);
        }
    }
    // ggml keeps the levels in bytes: a negative one (a weight whose sign the parity flipped)
    // comes back as 256 − |l| in the coordinate moves, and the result depends on it.
    let mut l = vec![0u8; x.len()];
    let (mut sumlx, mut suml2) = (0f32, 0f32);
    for ((&v, &w), l) in x.iter().zip(weight).zip(l.iter_mut()) {
        let li = nearest_int(iscale * v).min(nmax);
        *l = li as u8;
        sumlx += w * v * li as f32;
        suml2 += w * li as f32 * li as f32;
    }
    for _ in 0..5 {
        let mut changed = false;
        for ((&v, &w), l) in x.iter().zip(weight).zip(l.iter_mut()) {
            let mut slx = sumlx - w * v * *l as f32;
            let mut sl2 = suml2 - w * *l as f32 * *l as f32;
            if slx > 0.0 && sl2 > 0.0 {
                let new_l = nearest_int(v * sl2 / slx).min(nmax);
                if new_l != *l as i32 {
                    slx += w * v * new_l as f32;
                    sl2 += w * new_l as f32 * new_l as f32;
                    if slx * slx * suml2 > sumlx * sumlx * sl2 {
                        (*l, sumlx, suml2) = (new_l as u8, slx, sl2);
                        changed = true;
                    }
                }
            }
        }
        if !changed {
            break;
        }
    }
    if suml2 > 0.0 {
        sumlx / suml2
    } else {
        0.0
    }
}

/// Σ w·x·q and Σ w·q² with q = 2l + 1.
fn sums(weight: &[f32], xval: &[f32], l: &[i8]) -> (f32, f32) {
    let (mut sumqx, mut sumq2) = (0f32, 0f32);
    for ((&w, &x), &l) in weight.iter().zip(xval).zip(l) {
        let q = (2 * l as i32 + 1) as f32;
        sumqx += w * x * q;
        sumq2 += w * q * q;
    }
    (sumqx, sumq2)
}

/// The weights of the error in a block of 256: `importance · √(σ² + x²)` with an importance
/// matrix (σ² = `sigma_factor` · the block's mean square), else `plain · σ² + x²`.
pub(super) fn error_weights(
    x: &[f32],
    qw: Option<&[f32]>,
    sigma_factor: f32,
    plain: f32,
) -> Vec<f32> {
    let mut sumx2 = 0f32;
    for &v in x {
        sumx2 += v * v;
    }
    let sigma2 = sigma_factor * sumx2 / x.len() as f32;
    x.iter()
        .enumerate()
        .map(|(i, &v)| match qw {
            Some(qw) => qw[i] * (sigma2 + v * v).sqrt(),
            None if plain == 0.0 => v * v,
            None => plain * sigma2 + v * v,
        })
        .collect()
}
