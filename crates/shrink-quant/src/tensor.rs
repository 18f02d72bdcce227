//! Quantization schemes and quantized tensors stored at their real bit width.

use crate::grid::{Grid, GroupParams};
use crate::{pack, QuantError, Result};
use half::f16;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use shrink_io::ggml::GgmlType;

/// Which weights share a scale.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Granularity {
    /// One scale for the whole tensor.
    Tensor,
    /// One scale per output channel (row).
    Channel,
    /// One scale per run of this many consecutive weights in a row.
    Group(usize),
}

/// A weight quantization scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuantScheme {
    pub bits: u8,
    pub grid: Grid,
    pub granularity: Granularity,
    /// Search a range clip per group that minimises the (importance-weighted) squared error.
    pub search: bool,
}

impl QuantScheme {
    /// llama.cpp's Q4_0 block: 4 bits, groups of 32, full symmetric grid.
    pub const Q4_0: QuantScheme = QuantScheme {
        bits: 4,
        grid: Grid::SymmetricFull,
        granularity: Granularity::Group(32),
        search: false,
    };
    /// llama.cpp's Q4_1 block: 4 bits, groups of 32, min/max grid.
    pub const Q4_1: QuantScheme = QuantScheme {
        bits: 4,
        grid: Grid::Asymmetric,
        granularity: Granularity::Group(32),
        search: false,
    };
    /// llama.cpp's Q8_0 block: 8 bits, groups of 32, symmetric grid.
    pub const Q5_0: QuantScheme = QuantScheme {
        bits: 5,
        grid: Grid::SymmetricFull,
        granularity: Granularity::Group(32),
        search: false,
    };
    pub const Q5_1: QuantScheme = QuantScheme {
        bits: 5,
        grid: Grid::Asymmetric,
        granularity: Granularity::Group(32),
        search: false,
    };
    pub const Q8_0: QuantScheme = QuantScheme {
        bits: 8,
        grid: Grid::Symmetric,
        granularity: Granularity::Group(32),
        search: false,
    };

    pub fn validate(&self, cols: usize) -> Result<()> {
        if !(2..=8).contains(&self.bits) {
            return Err(QuantError::Scheme(format!(
                "bits must be 2..=8, got {}",
                self.bits
            )));
        }
        if let Granularity::Group(g) = self.granularity {
            if g == 0 || !cols.is_multiple_of(g) {
                return Err(QuantError::Scheme(format!(
                    "group size {g} does not divide the row length {cols}"
                )));
            }
        }
        Ok(())
    }

    /// Number of scale groups in a `rows × cols` tensor, and the group of element (r, c).
    pub(crate) fn groups(&self, rows: usize, cols: usize) -> usize {
        match self.granularity {
            Granularity::Tensor => 1,
            Granularity::Channel => rows,
            Granularity::Group(g) => rows * (cols / g),
        }
    }

    /// Weights per group in row-major order (a whole tensor's group: `usize::MAX`).
    pub(crate) fn group_len(&self, cols: usize) -> usize {
        match self.granularity {
            Granularity::Tensor => usize::MAX,
            Granularity::Channel => cols,
            Granularity::Group(g) => g,
        }
    }

    pub(crate) fn group_of(&self, cols: usize, r: usize, c: usize) -> usize {
        match self.granularity {
            Granularity::Tensor => 0,
            Granularity::Channel => r,
            Granularity::Group(g) => r * (cols / g) + c / g,
        }
    }

    /// The ggml block type this scheme is, if any.
    pub fn ggml_type(&self) -> Option<GgmlType> {
        match (self.bits, self.grid, self.granularity) {
            (4, Grid::SymmetricFull, Granularity::Group(32)) => Some(GgmlType::Q4_0),
            (4, Grid::Asymmetric, Granularity::Group(32)) => Some(GgmlType::Q4_1),
            (5, Grid::SymmetricFull, Granularity::Group(32)) => Some(GgmlType::Q5_0),
            (5, Grid::Asymmetric, Granularity::Group(32)) => Some(GgmlType::Q5_1),
            (8, Grid::Symmetric, Granularity::Group(32)) => Some(GgmlType::Q8_0),
            _ => None,
        }
    }

    /// The scheme a legacy ggml block type is (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0), without search.
    pub fn of_ggml(dtype: GgmlType) -> Option<QuantScheme> {
        [Self::Q4_0, Self::Q4_1, Self::Q5_0, Self::Q5_1, Self::Q8_0]
            .into_iter()
            .find(|s| s.ggml_type() == Some(dtype))
    }
}

/// A quantized `rows × cols` weight: codes packed at `bits` bits, fp16 scales (and minimums).
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizedTensor {
    pub rows: usize,
    pub cols: usize,
    pub scheme: QuantScheme,
    pub packed: Vec<u8>,
    pub scales: Vec<f16>,
    /// Minimums for the asymmetric grid (empty otherwise).
    pub mins: Vec<f16>,
}

impl QuantizedTensor {
    pub(crate) fn from_parts(
        rows: usize,
        cols: usize,
        scheme: QuantScheme,
        codes: &[u8],
        params: &[GroupParams],
    ) -> Self {
        Self {
            rows,
            cols,
            scheme,
            packed: pack::pack(codes, scheme.bits),
            scales: params.iter().map(|p| p.scale).collect(),
            mins: if scheme.grid == Grid::Asymmetric {
                params.iter().map(|p| p.min).collect()
            } else {
                vec![]
            },
        }
    }

    /// The unsigned codes, row-major.
    pub fn codes(&self) -> Vec<u8> {
        pack::unpack(&self.packed, self.scheme.bits, self.rows * self.cols)
    }

    /// The values the codes stand for, row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let codes = self.codes();
        let (grid, bits) = (self.scheme.grid, self.scheme.bits);
        let len = self.scheme.group_len(self.cols).max(1);
        let mut out = vec![0f32; codes.len()];
        out.par_chunks_mut(len)
            .zip(codes.par_chunks(len))
            .with_min_len(64)
            .enumerate()
            .for_each(|(g, (out, codes))| {
                let value = grid.decoder(bits, &self.params_of(g));
                for (o, &c) in out.iter_mut().zip(codes) {
                    *o = value(c);
                }
            });
        out
    }

    /// The fraction of weights whose value is exactly zero (without dequantizing the tensor).
    pub fn zero_fraction(&self) -> f64 {
        let (grid, bits) = (self.scheme.grid, self.scheme.bits);
        let len = self
            .scheme
            .group_len(self.cols)
            .min(self.rows * self.cols)
            .max(1);
        let zeros_in = |g: usize, codes: &[u8]| {
            let value = grid.decoder(bits, &self.params_of(g));
            codes.iter().filter(|&&c| value(c) == 0.0).count()
        };
        let zeros: usize = if (len * bits as usize).is_multiple_of(8) && len <= 256 {
            // Each group is whole bytes of the packed stream: unpacked a group at a time.
            self.packed
                .par_chunks(len * bits as usize / 8)
                .with_min_len(64)
                .enumerate()
                .map(|(g, packed)| {
                    let mut codes = [0u8; 256];
                    pack::unpack_into(packed, bits, &mut codes[..len]);
                    zeros_in(g, &codes[..len])
                })
                .sum()
        } else {
            let codes = self.codes();
            codes
                .chunks(len)
                .enumerate()
                .map(|(g, c)| zeros_in(g, c))
                .sum()
        };
        zeros as f64 / (self.rows * self.cols).max(1) as f64
    }

    fn params_of(&self, group: usize) -> GroupParams {
        GroupParams::from_stored(
            self.scales[group],
            self.mins.get(group).copied().unwrap_or(f16::ZERO),
        )
    }

    /// Bytes of storage: packed codes plus fp16 scales and minimums.
    pub fn size_bytes(&self) -> usize {
        self.packed.len() + 2 * (self.scales.len() + self.mins.len())
    }

    pub fn bits_per_weight(&self) -> f64 {
        self.size_bytes() as f64 * 8.0 / (self.rows * self.cols) as f64
    }

    /// The tensor as ggml blocks (Q4_0, Q4_1 or Q8_0), row-major, byte-identical to what
    /// llama.cpp writes for the same codes and scales.
    pub fn to_ggml_blocks(&self) -> Result<(GgmlType, Vec<u8>)> {
        let dtype = self.scheme.ggml_type().ok_or_else(|| {
            QuantError::Scheme(format!(
                "{:?} is not a ggml block type (Q4_0, Q4_1, Q5_0, Q5_1 or Q8_0 need groups of 32)",
                self.scheme
            ))
        })?;
        // A group of 32 codes is `4 · bits` whole bytes of the packed stream.
        let (bits, size) = (self.scheme.bits, dtype.type_size());
        let mut out = vec![0u8; self.rows * self.cols / 32 * size];
        out.par_chunks_mut(size)
            .zip(self.packed.par_chunks(4 * bits as usize))
            .enumerate()
            .with_min_len(256)
            .for_each(|(g, (out, packed))| {
                let mut block = [0u8; 32];
                pack::unpack_into(packed, bits, &mut block);
                let min = self.mins.get(g).copied().unwrap_or(f16::ZERO);
                encode_block(dtype, &block, self.scales[g], min, out);
            });
        Ok((dtype, out))
    }
}

/// Writes one group of 32 codes with its scale (and minimum) as a ggml block of `dtype` (Q4_0,
/// Q4_1, Q5_0, Q5_1 or Q8_0) into `out`, its `type_size()` bytes.
pub(crate) fn encode_block(
    dtype: GgmlType,
    codes: &[u8; 32],
    scale: f16,
    min: f16,
    out: &mut [u8],
) {
    out[..2].copy_from_slice(&scale.to_le_bytes());
    let mut at = 2;
    if matches!(dtype, GgmlType::Q4_1 | GgmlType::Q5_1) {
        out[2..4].copy_from_slice(&min.to_le_bytes());
        at = 4;
    }
    if dtype == GgmlType::Q8_0 {
        for (o, &q) in out[at..].iter_mut().zip(codes) {
            *o = (q as i32 - 128) as i8 as u8;
        }
        return;
    }
    if matches!(dtype, GgmlType::Q5_0 | GgmlType::Q5_1) {
        let qh = (0..32).fold(0u32, |h, j| h | ((codes[j] >> 4) as u32) << j);
        out[at..at + 4].copy_from_slice(&qh.to_le_bytes());
        at += 4;
    }
    for (j, o) in out[at..at + 16].iter_mut().enumerate() {
        *o = (codes[j] & 15) | (codes[j + 16] & 15) << 4;
    }
}

/// The codes, scale and minimum of one ggml block of `dtype` (Q4_0, Q4_1, Q5_0, Q5_1 or Q8_0):
/// the inverse of [`encode_block`].
pub(crate) fn decode_block(dtype: GgmlType, block: &[u8]) -> ([u8; 32], f16, f16) {
    let half = |at: usize| f16::from_le_bytes([block[at], block[at + 1]]);
    let (scale, mut at) = (half(0), 2);
    let mut min = f16::ZERO;
    if matches!(dtype, GgmlType::Q4_1 | GgmlType::Q5_1) {
        min = half(2);
        at = 4;
    }
    let mut codes = [0u8; 32];
    if dtype == GgmlType::Q8_0 {
        for (c, &q) in codes.iter_mut().zip(&block[at..]) {
            *c = (q as i8 as i32 + 128) as u8;
        }
        return (codes, scale, min);
    }
    let mut qh = 0u32;
    if matches!(dtype, GgmlType::Q5_0 | GgmlType::Q5_1) {
        qh = u32::from_le_bytes([block[at], block[at + 1], block[at + 2], block[at + 3]]);
        at += 4;
    }
    for (j, &b) in block[at..at + 16].iter().enumerate() {
        codes[j] = (b & 15) | (((qh >> j) & 1) as u8) << 4;
        codes[j + 16] = (b >> 4) | (((qh >> (j + 16)) & 1) as u8) << 4;
    }
    (codes, scale, min)
}

#[cfg(test)]
mod tests;
