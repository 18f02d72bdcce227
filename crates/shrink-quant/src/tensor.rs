//! Quantization schemes and quantized tensors stored at their real bit width.

use crate::grid::{Grid, GroupParams};
use crate::{pack, QuantError, Result};
use candle_core::quantized::GgmlDType;
use half::f16;
use serde::{Deserialize, Serialize};

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

    pub(crate) fn group_of(&self, cols: usize, r: usize, c: usize) -> usize {
        match self.granularity {
            Granularity::Tensor => 0,
            Granularity::Channel => r,
            Granularity::Group(g) => r * (cols / g) + c / g,
        }
    }

    /// The ggml block type this scheme is, if any.
    pub fn ggml_type(&self) -> Option<GgmlDType> {
        match (self.bits, self.grid, self.granularity) {
            (4, Grid::SymmetricFull, Granularity::Group(32)) => Some(GgmlDType::Q4_0),
            (4, Grid::Asymmetric, Granularity::Group(32)) => Some(GgmlDType::Q4_1),
            (5, Grid::SymmetricFull, Granularity::Group(32)) => Some(GgmlDType::Q5_0),
            (5, Grid::Asymmetric, Granularity::Group(32)) => Some(GgmlDType::Q5_1),
            (8, Grid::Symmetric, Granularity::Group(32)) => Some(GgmlDType::Q8_0),
            _ => None,
        }
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
        use rayon::prelude::*;
        let codes = self.codes();
        let grid = self.scheme.grid;
        (0..codes.len())
            .into_par_iter()
            .map(|k| {
                let g = self
                    .scheme
                    .group_of(self.cols, k / self.cols, k % self.cols);
                let p = GroupParams::from_stored(
                    self.scales[g],
                    self.mins.get(g).copied().unwrap_or(f16::ZERO),
                );
                grid.value(self.scheme.bits, &p, codes[k])
            })
            .collect()
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
    pub fn to_ggml_blocks(&self) -> Result<(GgmlDType, Vec<u8>)> {
        let dtype = self.scheme.ggml_type().ok_or_else(|| {
            QuantError::Scheme(format!(
                "{:?} is not a ggml block type (Q4_0, Q4_1, Q5_0, Q5_1 or Q8_0 need groups of 32)",
                self.scheme
            ))
        })?;
        let codes = self.codes();
        let mut out = Vec::with_capacity(self.rows * self.cols / 32 * dtype.type_size());
        for (g, block) in codes.chunks(32).enumerate() {
            out.extend(self.scales[g].to_le_bytes());
            match dtype {
                GgmlDType::Q8_0 => out.extend(block.iter().map(|&q| (q as i32 - 128) as i8 as u8)),
                _ => {
                    if matches!(dtype, GgmlDType::Q4_1 | GgmlDType::Q5_1) {
                        out.extend(self.mins[g].to_le_bytes());
                    }
                    if matches!(dtype, GgmlDType::Q5_0 | GgmlDType::Q5_1) {
                        let qh = (0..32).fold(0u32, |h, j| h | ((block[j] >> 4) as u32) << j);
                        out.extend(qh.to_le_bytes());
                    }
                    out.extend((0..16).map(|j| (block[j] & 15) | (block[j + 16] & 15) << 4));
                }
            }
        }
        Ok((dtype, out))
    }
}
