//! Quantization grids. Each maps a group of weights to a scale (and, asymmetric, a minimum) stored
//! as fp16 and to unsigned codes, with llama.cpp's exact arithmetic, so that a group of 32 on the
//! `SymmetricFull` 4-bit grid *is* a Q4_0 block, `Symmetric` 8-bit a Q8_0 block and `Asymmetric`
//! 4-bit a Q4_1 block.

use half::f16;
use serde::{Deserialize, Serialize};

/// How codes map to values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Grid {
    /// `d = amax / (2^(b-1) - 1)`, value `(q - 2^(b-1)) · d`, `q - 2^(b-1) ∈ ±(2^(b-1) - 1)` (Q8_0).
    Symmetric,
    /// `d = m / -2^(b-1)` with `m` the signed value of largest magnitude, value `(q - 2^(b-1)) · d`,
    /// all `2^b` levels used (Q4_0, Q5_0).
    SymmetricFull,
    /// `d = (max - min) / (2^b - 1)`, value `q · d + min` (Q4_1, Q5_1).
    Asymmetric,
}

/// The parameters of one group: value = `(code - offset) · scale + min`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GroupParams {
    /// The scale as stored (fp16).
    pub scale: f16,
    /// The minimum as stored (fp16), for the asymmetric grid.
    pub min: f16,
    /// The unrounded minimum llama.cpp computes codes with.
    min_unrounded: f32,
    /// The unrounded scale llama.cpp computes codes with.
    inv_scale: f32,
}

impl GroupParams {
    /// Parameters read back from storage.
    pub(crate) fn from_stored(scale: f16, min: f16) -> Self {
        let d = scale.to_f32();
        GroupParams {
            scale,
            min,
            min_unrounded: min.to_f32(),
            inv_scale: if d != 0.0 { 1.0 / d } else { 0.0 },
        }
    }
}

impl Grid {
    fn offset(self, bits: u8) -> f32 {
        match self {
            Grid::Symmetric | Grid::SymmetricFull => (1u32 << (bits - 1)) as f32,
            Grid::Asymmetric => 0.0,
        }
    }

    /// Scale and minimum for `values` with the range shrunk by `clip` (1 = the full range).
    pub fn params(self, bits: u8, values: &[f32], clip: f32) -> GroupParams {
        let (d, min) = match self {
            Grid::Symmetric => {
                let amax = values.iter().fold(0f32, |m, v| m.max(v.abs())) * clip;
                (amax / ((1u32 << (bits - 1)) - 1) as f32, 0.0)
            }
            Grid::SymmetricFull => {
                // The first value of largest magnitude (llama.cpp's strict `>` scan), found in
                // two passes that vectorize: the largest magnitude, then its first value.
                let amax = values.iter().fold(0f32, |m, v| m.max(v.abs()));
                let first = values.iter().find(|v| v.abs() == amax).copied();
                // All zeros: +0 as the scan leaves it (a first -0.0 would flip the scale's sign).
                let max = first.filter(|_| amax > 0.0).unwrap_or(0.0);
                (max * clip / -((1u32 << (bits - 1)) as f32), 0.0)
            }
            Grid::Asymmetric => {
                let lo = values.iter().fold(f32::INFINITY, |m, &v| m.min(v));
                let hi = values.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                let (lo, hi) = (lo * clip, hi * clip);
                ((hi - lo) / ((1u32 << bits) - 1) as f32, lo)
            }
        };
        GroupParams {
            scale: f16::from_f32(d),
            min: f16::from_f32(min),
            min_unrounded: min,
            inv_scale: if d != 0.0 { 1.0 / d } else { 0.0 },
        }
    }

    /// The code of `x`, exactly as llama.cpp's reference quantizers round. (Casts truncate toward
    /// zero as C's do, without a call to `truncf`; values are finite.)
    #[inline]
    pub fn code(self, bits: u8, p: &GroupParams, x: f32) -> u8 {
        let top = (1i32 << bits) - 1;
        let q = match self {
            // roundf(x·id), then shifted to unsigned.
            Grid::Symmetric => {
                let half = 1i32 << (bits - 1);
                let y = (x * p.inv_scale).clamp(-(half as f32), half as f32);
                let t = y as i32;
                // roundf: halves away from zero (y - t is exact).
                let r = t + i32::from(y - t as f32 >= 0.5) - i32::from(y - t as f32 <= -0.5);
                r.clamp(-(half - 1), half - 1) + half
            }
            // (int8)(x·id + 8.5), capped at 15.
            Grid::SymmetricFull => {
                ((x * p.inv_scale + self.offset(bits) + 0.5) as i32).clamp(0, top)
            }
            // (int8)((x - min)·id + 0.5), capped at 15. llama.cpp uses the unrounded minimum here.
            Grid::Asymmetric => (((x - p.min_unrounded) * p.inv_scale + 0.5) as i32).clamp(0, top),
        };
        q as u8
    }

    /// The value a code stands for (what llama.cpp's dequantizer computes).
    #[inline]
    pub fn value(self, bits: u8, p: &GroupParams, code: u8) -> f32 {
        self.decoder(bits, p)(code)
    }

    /// [`Grid::value`] for every code of one group: the scale (and minimum) widened once.
    #[inline]
    pub fn decoder(self, bits: u8, p: &GroupParams) -> impl Fn(u8) -> f32 + Copy {
        let (d, min, offset) = (p.scale.to_f32(), p.min.to_f32(), self.offset(bits));
        let asymmetric = self == Grid::Asymmetric;
        move |code| {
            if asymmetric {
                code as f32 * d + min
            } else {
                (code as f32 - offset) * d
            }
        }
    }

    /// Chooses the group's parameters and writes the codes of `values`. Without `search` this is
    /// llama.cpp's plain quantizer. With `search`, candidate parameters are tried and the ones
    /// with the least Σ importance·error² kept: for the full symmetric grid, llama.cpp's
    /// `make_qx_quants` sweep of 19 inverse scales around `-2^(b-1)/max`, each with its
    /// least-squares optimal scale; for the other grids, shrinking the range by up to 40%, and
    /// for the asymmetric grid also `make_qkx3_quants`' sweep of 37 inverse scales, each with its
    /// least-squares scale and minimum (which finds a group that already lies on a coarser grid
    /// of the same kind: Q4_1 weights in Q5_1 exactly).
    pub fn quantize_group(
        self,
        bits: u8,
        values: &[f32],
        importance: Option<&[f32]>,
        search: bool,
        codes: &mut [u8],
    ) -> GroupParams {
        let weight = |j: usize| importance.map(|w| w[j]).unwrap_or(1.0);
        let error = |p: &GroupParams| -> f64 {
            values
                .iter()
                .enumerate()
                .map(|(j, &x)| {
                    let e = (x - self.value(bits, p, self.code(bits, p, x))) as f64;
                    e * e * weight(j) as f64
                })
                .sum()
        };
        let mut best = self.params(bits, values, 1.0);
        if search {
            let mut best_err = error(&best);
            let mut candidates: Vec<GroupParams> = match self {
                Grid::SymmetricFull => self.least_squares_candidates(bits, values, &weight),
                _ => (1..=20)
                    .map(|step| self.params(bits, values, 1.0 - 0.02 * step as f32))
                    .collect(),
            };
            if self == Grid::Asymmetric {
                candidates.extend(affine_least_squares_candidates(bits, values, &weight));
            }
            for p in candidates {
                let e = error(&p);
                if e < best_err {
                    best = p;
                    best_err = e;
                }
            }
        }
        self.write_codes(bits, &best, values, codes);
        best
    }

    /// The codes of `values` on one group's grid, the grid's branch taken once per group.
    fn write_codes(self, bits: u8, p: &GroupParams, values: &[f32], codes: &mut [u8]) {
        fn fill(codes: &mut [u8], values: &[f32], code: impl Fn(f32) -> u8) {
            for (c, &x) in codes.iter_mut().zip(values) {
                *c = code(x);
            }
        }
        match self {
            Grid::Symmetric => fill(codes, values, |x| Grid::Symmetric.code(bits, p, x)),
            Grid::SymmetricFull => fill(codes, values, |x| Grid::SymmetricFull.code(bits, p, x)),
            Grid::Asymmetric => fill(codes, values, |x| Grid::Asymmetric.code(bits, p, x)),
        }
    }

    /// `make_qx_quants`: for inverse scales `-(nmax + 0.1·k)/max`, k ∈ -9..=9, round, then refit
    /// the scale by weighted least squares.
    fn least_squares_candidates(
        self,
        bits: u8,
        values: &[f32],
        weight: &dyn Fn(usize) -> f32,
    ) -> Vec<GroupParams> {
        let nmax = (1u32 << (bits - 1)) as f32;
        let max = values
            .iter()
            .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
        if max == 0.0 {
            return vec![];
        }
        (-9..=9)
            .filter_map(|k| {
                let iscale = -(nmax + 0.1 * k as f32) / max;
                let (mut sum_xl, mut sum_ll) = (0f64, 0f64);
                for (j, &x) in values.iter().enumerate() {
                    let l = (iscale * x).round().clamp(-nmax, nmax - 1.0) as f64;
                    sum_xl += (weight(j) * x) as f64 * l;
                    sum_ll += weight(j) as f64 * l * l;
                }
                (sum_ll > 0.0).then(|| {
                    let d = (sum_xl / sum_ll) as f32;
                    GroupParams {
                        scale: f16::from_f32(d),
                        min: f16::ZERO,
                        min_unrounded: 0.0,
                        inv_scale: 1.0 / f16::from_f32(d).to_f32(),
                    }
                })
            })
            .collect()
    }
}

/// `make_qkx3_quants`' candidates for the asymmetric grid: for inverse scales
/// `(2^b − 1 − 0.9 + 0.05·k)/(max − min)`, k ∈ 0..=36 (the minimum at most 0), round, then refit
/// the scale and minimum by weighted least squares (the minimum kept at most 0).
fn affine_least_squares_candidates(
    bits: u8,
    values: &[f32],
    weight: &dyn Fn(usize) -> f32,
) -> Vec<GroupParams> {
    let nmax = ((1u32 << bits) - 1) as f64;
    let lo = values.iter().fold(0f32, |m, &v| m.min(v)) as f64;
    let hi = values.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    if hi <= lo {
        return vec![];
    }
    let (mut sum_w, mut sum_x) = (0f64, 0f64);
    for (j, &x) in values.iter().enumerate() {
        sum_w += weight(j) as f64;
        sum_x += weight(j) as f64 * x as f64;
    }
    (0..=36)
        .filter_map(|k| {
            let iscale = (nmax - 0.9 + 0.05 * k as f64) / (hi - lo);
            let (mut sum_l, mut sum_l2, mut sum_xl) = (0f64, 0f64, 0f64);
            for (j, &x) in values.iter().enumerate() {
                let l = (iscale * (x as f64 - lo)).round().clamp(0.0, nmax);
                let w = weight(j) as f64;
                sum_l += w * l;
                sum_l2 += w * l * l;
                sum_xl += w * l * x as f64;
            }
            let det = sum_w * sum_l2 - sum_l * sum_l;
            if det <= 0.0 {
                return None;
            }
            let (mut scale, mut min) = (
                (sum_w * sum_xl - sum_x * sum_l) / det,
                (sum_l2 * sum_x - sum_l * sum_xl) / det,
            );
            if min > 0.0 {
                (scale, min) = (sum_xl / sum_l2, 0.0);
            }
            let stored = f16::from_f32(scale as f32);
            (stored.to_f32() > 0.0).then(|| GroupParams {
                scale: stored,
                min: f16::from_f32(min as f32),
                min_unrounded: f16::from_f32(min as f32).to_f32(),
                inv_scale: 1.0 / stored.to_f32(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests;
