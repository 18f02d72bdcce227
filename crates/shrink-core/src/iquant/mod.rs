//! llama.cpp's i-quant block types: their layouts and dequantizers, byte for byte as ggml reads
//! them (`dequantize_row_*` in `ggml-quants.c`), and the format's codebooks ([`tables`],
//! generated from llama.cpp's source). The quantizers are `shrink_quant::iquant`'s.
//!
//! So far IQ4_NL (blocks of 32: an f16 scale and sixteen bytes of 4-bit indices into a
//! non-linear codebook) and IQ4_XS (super-blocks of 256: an f16 scale, eight 6-bit sub-block
//! scales and the same indices).
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
use tables::KVALUES_IQ4NL;

/// An i-quant block type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IQuant {
    /// 32 weights: f16 scale, 16 bytes of indices (4.5 bits per weight).
    IQ4NL,
    /// 256 weights: f16 scale, 6-bit scales of eight sub-blocks, 128 bytes of indices (4.25).
    IQ4XS,
}

impl IQuant {
    /// Every i-quant shrink reads and writes.
    pub const ALL: [IQuant; 2] = [IQuant::IQ4NL, IQuant::IQ4XS];

    /// ggml's type name (`iq4_xs`).
    pub fn name(self) -> &'static str {
        match self {
            IQuant::IQ4NL => "iq4_nl",
            IQuant::IQ4XS => "iq4_xs",
        }
    }

    /// ggml's type id (`enum ggml_type`).
    pub fn ggml_id(self) -> u32 {
        match self {
            IQuant::IQ4NL => 20,
            IQuant::IQ4XS => 23,
        }
    }

    /// Weights per block.
    pub fn block_size(self) -> usize {
        match self {
            IQuant::IQ4NL => 32,
            IQuant::IQ4XS => 256,
        }
    }

    /// Bytes per block.
    pub fn type_size(self) -> usize {
        match self {
            IQuant::IQ4NL => 18,
            IQuant::IQ4XS => 136,
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
            }
        }
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
