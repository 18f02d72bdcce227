//! One weight row taken apart for the panels: unsigned codes, integer sub-block scales (and
//! minima), float block scales, decoded from each block type's bytes.

use super::{BlockType, Mins};
use crate::iquant::tables::{
    IQ2S_GRID, IQ2XS_GRID, IQ2XXS_GRID, IQ3S_GRID, IQ3XXS_GRID, KMASK_IQ2XS, KSIGNS_IQ2XS,
    KVALUES_IQ4NL,
};
use half::f16;

/// One weight row taken apart: unsigned codes, an integer scale (and minimum) per sub-block, a
/// float scale (and minimum scale) per block.
#[derive(Clone, Debug)]
pub(super) struct Decoded {
    pub(super) codes: Vec<u8>,
    pub(super) scales: Vec<i32>,
    pub(super) mins: Vec<i32>,
    pub(super) d: Vec<f32>,
    pub(super) dmin: Vec<f32>,
}

pub(super) fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Q4_K/Q5_K's 6-bit scale and minimum of sub-block `j` (ggml's `get_scale_min_k4`).
fn scale_min_k4(j: usize, q: &[u8]) -> (i32, i32) {
    if j < 4 {
        ((q[j] & 63) as i32, (q[j + 4] & 63) as i32)
    } else {
        (
            ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4)) as i32,
            ((q[j + 4] >> 4) | ((q[j] >> 6) << 4)) as i32,
        )
    }
}

impl Decoded {
    pub(super) fn new(ty: BlockType, cols: usize) -> Self {
        let subs = cols / ty.sub_len();
        let blocks = cols / ty.block_len();
        Decoded {
            codes: vec![0; cols],
            scales: vec![1; subs],
            mins: vec![0; subs],
            d: vec![0.0; blocks],
            dmin: vec![0.0; blocks],
        }
    }

    /// The weights, `d · scale · (code − offset) − dmin · min` (or `+ m`).
    pub(super) fn values(&self, ty: BlockType, out: &mut [f32]) {
        let (g, per) = (ty.sub_len(), ty.block_len() / ty.sub_len());
        for (j, (out, codes)) in out.chunks_mut(g).zip(self.codes.chunks(g)).enumerate() {
            let b = j / per;
            let dl = self.d[b] * (self.scales[j] as f32 * ty.factor());
            let ml = match ty.mins() {
                Mins::None => 0.0,
                Mins::PerBlock => -self.dmin[b],
                Mins::PerSub => self.dmin[b] * self.mins[j] as f32,
            };
            for (o, &c) in out.iter_mut().zip(codes) {
                *o = dl * (c as i32 - ty.offset()) as f32 - ml;
            }
        }
    }

    pub(super) fn decode(&mut self, ty: BlockType, row: &[u8]) {
        let (bl, bb) = (ty.block_len(), ty.block_bytes());
        for (b, x) in row.chunks_exact(bb).enumerate() {
            let codes = &mut self.codes[b * bl..(b + 1) * bl];
            let subs = bl / ty.sub_len();
            let (scales, mins) = (
                &mut self.scales[b * subs..(b + 1) * subs],
                &mut self.mins[b * subs..(b + 1) * subs],
            );
            match ty {
                BlockType::Q4_0 | BlockType::Q4_1 => {
                    let qs = if ty == BlockType::Q4_0 { 2 } else { 4 };
                    self.d[b] = f16_at(x, 0);
                    if ty == BlockType::Q4_1 {
                        self.dmin[b] = f16_at(x, 2);
                    }
                    for i in 0..16 {
                        codes[i] = x[qs + i] & 0xF;
                        codes[i + 16] = x[qs + i] >> 4;
                    }
                }
                BlockType::Q5_0 | BlockType::Q5_1 => {
                    let at = if ty == BlockType::Q5_0 { 2 } else { 4 };
                    self.d[b] = f16_at(x, 0);
                    if ty == BlockType::Q5_1 {
                        self.dmin[b] = f16_at(x, 2);
                    }
                    let qh = u32::from_le_bytes([x[at], x[at + 1], x[at + 2], x[at + 3]]);
                    let qs = &x[at + 4..at + 20];
                    for i in 0..16 {
                        let h0 = (((qh >> i) << 4) & 0x10) as u8;
                        let h1 = ((qh >> (i + 12)) & 0x10) as u8;
                        codes[i] = (qs[i] & 0xF) | h0;
                        codes[i + 16] = (qs[i] >> 4) | h1;
                    }
                }
                BlockType::Q8_0 => {
                    self.d[b] = f16_at(x, 0);
                    for i in 0..32 {
                        codes[i] = (x[2 + i] as i8 as i32 + 128) as u8;
                    }
                }
                BlockType::Q2K => {
                    let (sc, qs) = (&x[..16], &x[16..80]);
                    self.d[b] = f16_at(x, 80);
                    self.dmin[b] = f16_at(x, 82);
                    for (j, &s) in sc.iter().enumerate() {
                        scales[j] = (s & 0xF) as i32;
                        mins[j] = (s >> 4) as i32;
                    }
                    for n in 0..2 {
                        for j in 0..4 {
                            for l in 0..32 {
                                codes[n * 128 + j * 32 + l] = (qs[n * 32 + l] >> (2 * j)) & 3;
                            }
                        }
                    }
                }
                BlockType::Q3K => {
                    let (hm, qs, sc) = (&x[..32], &x[32..96], &x[96..108]);
                    self.d[b] = f16_at(x, 108);
                    let aux = |i: usize| {
                        u32::from_le_bytes([sc[4 * i], sc[4 * i + 1], sc[4 * i + 2], sc[4 * i + 3]])
                    };
                    let (a0, a1, tmp) = (aux(0), aux(1), aux(2));
                    let (k1, k2) = (0x0303_0303u32, 0x0f0f_0f0fu32);
                    let words = [
                        (a0 & k2) | ((tmp & k1) << 4),
                        (a1 & k2) | (((tmp >> 2) & k1) << 4),
                        ((a0 >> 4) & k2) | (((tmp >> 4) & k1) << 4),
                        ((a1 >> 4) & k2) | (((tmp >> 6) & k1) << 4),
                    ];
                    for (j, s) in scales.iter_mut().enumerate() {
                        *s = ((words[j / 4] >> (8 * (j % 4))) & 0xFF) as i8 as i32 - 32;
                    }
                    for n in 0..2 {
                        for j in 0..4 {
                            let m = 1u8 << (n * 4 + j);
                            for l in 0..32 {
                                let low = (qs[n * 32 + l] >> (2 * j)) & 3;
                                let high = if hm[l] & m != 0 { 4 } else { 0 };
                                codes[n * 128 + j * 32 + l] = low | high;
                            }
                        }
                    }
                }
                BlockType::Q4K | BlockType::Q5K => {
                    self.d[b] = f16_at(x, 0);
                    self.dmin[b] = f16_at(x, 2);
                    let sc = &x[4..16];
                    for j in 0..8 {
                        (scales[j], mins[j]) = scale_min_k4(j, sc);
                    }
                    let (qh, ql) = if ty == BlockType::Q5K {
                        (Some(&x[16..48]), &x[48..176])
                    } else {
                        (None, &x[16..144])
                    };
                    for c in 0..4 {
                        for l in 0..32 {
                            let q = ql[c * 32 + l];
                            let (mut lo, mut hi) = (q & 0xF, q >> 4);
                            if let Some(qh) = qh {
                                lo |= ((qh[l] >> (2 * c)) & 1) << 4;
                                hi |= ((qh[l] >> (2 * c + 1)) & 1) << 4;
                            }
                            codes[c * 64 + l] = lo;
                            codes[c * 64 + 32 + l] = hi;
                        }
                    }
                }
                BlockType::IQ4NL => {
                    self.d[b] = f16_at(x, 0);
                    iq4_codes(&x[2..18], codes);
                }
                BlockType::IQ4XS => {
                    self.d[b] = f16_at(x, 0);
                    let scales_h = u16::from_le_bytes([x[2], x[3]]);
                    for (ib, s) in scales.iter_mut().enumerate() {
                        let low = (x[4 + ib / 2] >> (4 * (ib % 2))) & 0xf;
                        let high = ((scales_h >> (2 * ib)) & 3) as u8;
                        *s = (low | high << 4) as i32 - 32;
                        iq4_codes(&x[8 + 16 * ib..24 + 16 * ib], &mut codes[32 * ib..]);
                    }
                }
                BlockType::IQ3XXS => {
                    self.d[b] = f16_at(x, 0);
                    let (qs, signs) = (&x[2..66], &x[66..98]);
                    for (ib, s) in scales.iter_mut().enumerate() {
                        let aux = u32::from_le_bytes(signs[4 * ib..4 * ib + 4].try_into().unwrap());
                        *s = 2 * (aux >> 28) as i32 + 1;
                        for l in 0..4 {
                            let sign = KSIGNS_IQ2XS[((aux >> (7 * l)) & 127) as usize];
                            for half in 0..2 {
                                let grid = IQ3XXS_GRID[qs[8 * ib + 2 * l + half] as usize];
                                let at = 32 * ib + 8 * l + 4 * half;
                                grid_codes(grid as u64, sign >> (4 * half), &mut codes[at..at + 4]);
                            }
                        }
                    }
                }
                BlockType::IQ3S => {
                    self.d[b] = f16_at(x, 0);
                    let (qs, qh, signs) = (&x[2..66], &x[66..74], &x[74..106]);
                    for (ib, s) in scales.iter_mut().enumerate() {
                        *s = 2 * ((x[106 + ib / 2] >> (4 * (ib % 2))) & 0xf) as i32 + 1;
                        for k in 0..8 {
                            let high = ((qh[ib] >> k) & 1) as usize;
                            let grid = IQ3S_GRID[qs[8 * ib + k] as usize | high << 8];
                            let sign = signs[4 * ib + k / 2] >> (4 * (k % 2));
                            let at = 32 * ib + 4 * k;
                            grid_codes(grid as u64, sign, &mut codes[at..at + 4]);
                        }
                    }
                }
                BlockType::IQ2XXS => {
                    self.d[b] = f16_at(x, 0);
                    for (ib, s) in scales.iter_mut().enumerate() {
                        let q = &x[2 + 8 * ib..10 + 8 * ib];
                        let aux = u32::from_le_bytes(q[4..8].try_into().unwrap());
                        *s = 2 * (aux >> 28) as i32 + 1;
                        for l in 0..4 {
                            let sign = KSIGNS_IQ2XS[((aux >> (7 * l)) & 127) as usize];
                            let at = 32 * ib + 8 * l;
                            grid_codes(IQ2XXS_GRID[q[l] as usize], sign, &mut codes[at..at + 8]);
                        }
                    }
                }
                BlockType::IQ2XS | BlockType::IQ2S => {
                    self.d[b] = f16_at(x, 0);
                    let sc = if ty == BlockType::IQ2XS { 66 } else { 74 };
                    for (j, s) in scales.iter_mut().enumerate() {
                        *s = 2 * ((x[sc + j / 2] >> (4 * (j % 2))) & 0xf) as i32 + 1;
                    }
                    for k in 0..32 {
                        let (grid, sign) = if ty == BlockType::IQ2XS {
                            let q = u16::from_le_bytes([x[2 + 2 * k], x[3 + 2 * k]]);
                            (
                                IQ2XS_GRID[(q & 511) as usize],
                                KSIGNS_IQ2XS[(q >> 9) as usize],
                            )
                        } else {
                            let high = ((x[66 + k / 4] >> (2 * (k % 4))) & 3) as usize;
                            (IQ2S_GRID[x[2 + k] as usize | high << 8], x[34 + k])
                        };
                        grid_codes(grid, sign, &mut codes[8 * k..8 * k + 8]);
                    }
                }
                BlockType::Q6K => {
                    let (ql, qh, sc) = (&x[..128], &x[128..192], &x[192..208]);
                    self.d[b] = f16_at(x, 208);
                    for (s, &v) in scales.iter_mut().zip(sc) {
                        *s = v as i8 as i32;
                    }
                    for n in 0..2 {
                        let (ql, qh) = (&ql[n * 64..], &qh[n * 32..]);
                        let out = &mut codes[n * 128..];
                        for l in 0..32 {
                            out[l] = (ql[l] & 0xF) | ((qh[l] & 3) << 4);
                            out[l + 32] = (ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4);
                            out[l + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
                            out[l + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
                        }
                    }
                }
            }
        }
    }
}

/// 32 IQ4 codes from 16 bytes of indices (low nibbles first, then high): the codebook's values
/// shifted by 128.
fn iq4_codes(qs: &[u8], codes: &mut [u8]) {
    for (i, &q) in qs.iter().enumerate() {
        codes[i] = (KVALUES_IQ4NL[(q & 0xf) as usize] as i32 + 128) as u8;
        codes[i + 16] = (KVALUES_IQ4NL[(q >> 4) as usize] as i32 + 128) as u8;
    }
}

/// The codes of a grid point's magnitudes (a byte each, as many as `codes` holds) under `sign`'s
/// bits (ggml's `kmask_iq2xs`).
fn grid_codes(grid: u64, sign: u8, codes: &mut [u8]) {
    for (j, c) in codes.iter_mut().enumerate() {
        *c = signed_code((grid >> (8 * j)) as u8, sign & KMASK_IQ2XS[j] != 0);
    }
}

/// A grid magnitude with its sign, shifted by 128.
fn signed_code(magnitude: u8, negative: bool) -> u8 {
    let v = magnitude as i32;
    (if negative { 128 - v } else { 128 + v }) as u8
}
