//! llama.cpp's i-quant block types: their layouts and dequantizers, byte for byte as ggml reads
//! them (`dequantize_row_*` in `ggml-quants.c`), and the format's codebooks ([`tables`],
//! generated from llama.cpp's source). The quantizers are `shrink_quant::iquant`'s.
//!
//! So far IQ4_NL (blocks of 32: an f16 scale and sixteen bytes of 4-bit indices into a
//! non-linear codebook), IQ4_XS (super-blocks of 256: an f16 scale, eight 6-bit sub-block
//! scales and the same indices) and IQ3_XXS (super-blocks of 256: an f16 scale, one byte per four
//! weights indexing a grid of 256 magnitude quadruples, and per 32 weights a 4-bit scale and
//! seven sign bits per eight weights), IQ3_S (super-blocks of 256: an f16 scale, per four
//! weights a 9-bit index into a grid of 512 quadruples, its eighth bit in a separate byte per 32
//! weights, a sign byte per eight weights, and a 4-bit scale `1 + 2s` per 32), IQ2_XXS (super-blocks of 256: per 32 weights four bytes indexing a grid of 256
//! magnitude octets, 28 sign bits and a 4-bit scale), IQ2_XS (a 16-bit word per eight weights
//! holding an index into a grid of 512 octets and seven sign bits, and a 4-bit scale per 16
//! weights) and IQ2_S (a 10-bit index into a grid of 1024 octets, eight sign bits, a 4-bit scale
//! per 16 weights).
//!
//! ```
//! use shrink_core::iquant::IQuant;
//! // One IQ4_NL block: scale 0.5, every index 8 (the codebook's value 1).
//! let mut block = vec![0x88u8; 18];
//! block[..2].copy_from_slice(&half::f16::from_f32(0.5).to_le_bytes());
//! let mut y = vec![0f32; 32];
//! IQuant::IQ4NL.dequantize_row(&block, &mut y);
//! assert!(y.iter().all(|&v| v == 0.5));
//! ```

#[rustfmt::skip]
pub mod tables;

use half::f16;
use tables::{
    IQ2S_GRID, IQ2XS_GRID, IQ2XXS_GRID, IQ3S_GRID, IQ3XXS_GRID, KMASK_IQ2XS, KSIGNS_IQ2XS,
    KVALUES_IQ4NL,
};

/// An i-quant block type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IQuant {
    /// 32 weights: f16 scale, 16 bytes of indices (4.5 bits per weight).
    IQ4NL,
    /// 256 weights: f16 scale, 6-bit scales of eight sub-blocks, 128 bytes of indices (4.25).
    IQ4XS,
    /// 256 weights: f16 scale, 64 indices into a grid of 256 points of 4 magnitudes, and per
    /// sub-block of 32 a 4-bit scale and 28 bits of signs (3.0625).
    IQ3XXS,
    /// 256 weights: f16 scale, 64 9-bit indices into a grid of 512 points of 4 magnitudes, a sign
    /// bit per weight and a 4-bit scale per 32 (3.4375).
    IQ3S,
    /// 256 weights: f16 scale, per 32 weights four indices into a grid of 256 magnitude octets,
    /// 28 bits of signs and a 4-bit scale (2.0625).
    IQ2XXS,
    /// 256 weights: f16 scale, per eight weights a 16-bit word (9-bit index into a grid of 512
    /// magnitude octets, 7 sign bits), a 4-bit scale per 16 weights (2.3125).
    IQ2XS,
    /// 256 weights: f16 scale, per eight weights a 10-bit index into a grid of 1024 magnitude
    /// octets and eight sign bits, a 4-bit scale per 16 weights (2.5625).
    IQ2S,
}

impl IQuant {
    /// Every i-quant shrink reads and writes.
    pub const ALL: [IQuant; 7] = [
        IQuant::IQ4NL,
        IQuant::IQ4XS,
        IQuant::IQ3S,
        IQuant::IQ3XXS,
        IQuant::IQ2S,
        IQuant::IQ2XS,
        IQuant::IQ2XXS,
    ];

    /// ggml's type name (`iq4_xs`).
    pub fn name(self) -> &'static str {
        match self {
            IQuant::IQ4NL => "iq4_nl",
            IQuant::IQ4XS => "iq4_xs",
            IQuant::IQ3XXS => "iq3_xxs",
            IQuant::IQ3S => "iq3_s",
            IQuant::IQ2XXS => "iq2_xxs",
            IQuant::IQ2XS => "iq2_xs",
            IQuant::IQ2S => "iq2_s",
        }
    }

    /// Bits of a weight's code, before scales and signs (4 for the IQ4 types, 3 for IQ3, 2 for IQ2).
    pub fn bits(self) -> u8 {
        match self {
            IQuant::IQ4NL | IQuant::IQ4XS => 4,
            IQuant::IQ3XXS | IQuant::IQ3S => 3,
            IQuant::IQ2XXS | IQuant::IQ2XS | IQuant::IQ2S => 2,
        }
    }

    /// ggml's type id (`enum ggml_type`).
    pub fn ggml_id(self) -> u32 {
        match self {
            IQuant::IQ4NL => 20,
            IQuant::IQ4XS => 23,
            IQuant::IQ3XXS => 18,
            IQuant::IQ3S => 21,
            IQuant::IQ2XXS => 16,
            IQuant::IQ2XS => 17,
            IQuant::IQ2S => 22,
        }
    }

    /// Weights per block.
    pub fn block_size(self) -> usize {
        match self {
            IQuant::IQ4NL => 32,
            IQuant::IQ4XS
            | IQuant::IQ3XXS
            | IQuant::IQ3S
            | IQuant::IQ2XXS
            | IQuant::IQ2XS
            | IQuant::IQ2S => 256,
        }
    }

    /// Bytes per block.
    pub fn type_size(self) -> usize {
        match self {
            IQuant::IQ4NL => 18,
            IQuant::IQ4XS => 136,
            IQuant::IQ3XXS => 98,
            IQuant::IQ3S => 110,
            IQuant::IQ2XXS => 66,
            IQuant::IQ2XS => 74,
            IQuant::IQ2S => 82,
        }
    }

    /// Bytes of a row of `n` weights (a multiple of the block size).
    pub fn row_bytes(self, n: usize) -> usize {
        n / self.block_size() * self.type_size()
    }

    /// The weights a row of blocks stands for (ggml's `dequantize_row_*`).
    pub fn dequantize_row(self, blocks: &[u8], out: &mut [f32]) {
        let (n, size) = (self.block_size(), self.type_size());
        assert_eq!(blocks.len(), self.row_bytes(out.len()), "the row's bytes");
        for (block, y) in blocks.chunks(size).zip(out.chunks_mut(n)) {
            let d = f16::from_le_bytes([block[0], block[1]]).to_f32();
            match self {
                IQuant::IQ4NL => nibbles(&block[2..18], d, y),
                IQuant::IQ4XS => {
                    let scales_h = u16::from_le_bytes([block[2], block[3]]);
                    let (scales_l, qs) = (&block[4..8], &block[8..136]);
                    for (ib, (q, y)) in qs.chunks(16).zip(y.chunks_mut(32)).enumerate() {
                        let low = (scales_l[ib / 2] >> (4 * (ib % 2))) & 0xf;
                        let high = ((scales_h >> (2 * ib)) & 3) as u8;
                        let ls = (low | high << 4) as i32;
                        nibbles(q, d * (ls - 32) as f32, y);
                    }
                }
                IQuant::IQ3XXS => {
                    let (qs, signs) = (&block[2..66], &block[66..98]);
                    for (ib, y) in y.chunks_mut(32).enumerate() {
                        let aux = u32::from_le_bytes(signs[4 * ib..4 * ib + 4].try_into().unwrap());
                        let db = d * (0.5 + (aux >> 28) as f32) * 0.5;
                        for (l, y) in y.chunks_mut(8).enumerate() {
                            let sign = KSIGNS_IQ2XS[((aux >> (7 * l)) & 127) as usize];
                            for (half, y) in y.chunks_mut(4).enumerate() {
                                let grid = IQ3XXS_GRID[qs[8 * ib + 2 * l + half] as usize];
                                magnitudes(grid as u64, sign >> (4 * half), db, y);
                            }
                        }
                    }
                }
                IQuant::IQ3S => {
                    let (qs, qh) = (&block[2..66], &block[66..74]);
                    let (signs, scales) = (&block[74..106], &block[106..110]);
                    for (ib, y) in y.chunks_mut(32).enumerate() {
                        let s = scales[ib / 2] >> (4 * (ib % 2)) & 0xf;
                        let db = d * (1 + 2 * s as i32) as f32;
                        for (l, y) in y.chunks_mut(8).enumerate() {
                            for (half, y) in y.chunks_mut(4).enumerate() {
                                let k = 2 * l + half;
                                let high = ((qh[ib] >> k) & 1) as usize;
                                let grid = IQ3S_GRID[qs[8 * ib + k] as usize | high << 8];
                                let sign = signs[4 * ib + l] >> (4 * half);
                                magnitudes(grid as u64, sign, db, y);
                            }
                        }
                    }
                }
                IQuant::IQ2XXS => {
                    for (ib, y) in y.chunks_mut(32).enumerate() {
                        let q = &block[2 + 8 * ib..10 + 8 * ib];
                        let aux = u32::from_le_bytes(q[4..8].try_into().unwrap());
                        let db = d * (0.5 + (aux >> 28) as f32) * 0.25;
                        for (l, y) in y.chunks_mut(8).enumerate() {
                            let sign = KSIGNS_IQ2XS[((aux >> (7 * l)) & 127) as usize];
                            magnitudes(IQ2XXS_GRID[q[l] as usize], sign, db, y);
                        }
                    }
                }
                IQuant::IQ2XS => {
                    let scales = &block[66..74];
                    for (k, y) in y.chunks_mut(8).enumerate() {
                        let q = u16::from_le_bytes([block[2 + 2 * k], block[3 + 2 * k]]);
                        let s = scales[k / 4] >> (4 * (k % 4 / 2)) & 0xf;
                        let db = d * (0.5 + s as f32) * 0.25;
                        let sign = KSIGNS_IQ2XS[(q >> 9) as usize];
                        magnitudes(IQ2XS_GRID[(q & 511) as usize], sign, db, y);
                    }
                }
                IQuant::IQ2S => {
                    let (qs, signs) = (&block[2..34], &block[34..66]);
                    let (qh, scales) = (&block[66..74], &block[74..82]);
                    for (k, y) in y.chunks_mut(8).enumerate() {
                        let s = scales[k / 4] >> (4 * (k % 4 / 2)) & 0xf;
                        let db = d * (0.5 + s as f32) * 0.25;
                        let high = ((qh[k / 4] >> (2 * (k % 4))) & 3) as usize;
                        magnitudes(IQ2S_GRID[qs[k] as usize | high << 8], signs[k], db, y);
                    }
                }
            }
        }
    }
}

/// Weights `db · g · ±1` of a grid point's magnitudes `g` (one byte each, as many as `y` holds),
/// negative where `sign` has the weight's bit (ggml's `kmask_iq2xs`).
fn magnitudes(grid: u64, sign: u8, db: f32, y: &mut [f32]) {
    for (j, y) in y.iter_mut().enumerate() {
        let g = (grid >> (8 * j)) as u8 as f32;
        let neg = sign & KMASK_IQ2XS[j] != 0;
        *y = db * g * if neg { -1.0 } else { 1.0 };
    }
}

/// 32 weights from 16 bytes of indices (low nibbles first, then high) and a scale.
fn nibbles(qs: &[u8], d: f32, y: &mut [f32]) {
    for (j, &q) in qs.iter().enumerate() {
        y[j] = d * KVALUES_IQ4NL[(q & 0xf) as usize] as f32;
        y[j + 16] = d * KVALUES_IQ4NL[(q >> 4) as usize] as f32;
    }
}

#[cfg(test)]
mod tests;
