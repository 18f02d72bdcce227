//! llama.cpp's k-quants (Q2_K … Q6_K): super-blocks of 256 weights whose 16 or 8 group scales are
//! themselves quantized. Scales and minima come from candle's ports of ggml's quantizers, plain or
//! importance-weighted (llama.cpp's `--imatrix`); GPTQ then picks the codes inside those fixed
//! blocks. Each block is read here as per-group affine grids, `value = a·(q − offset) − m`, with
//! llama.cpp's exact arithmetic, and codes are written back into the block at their bit positions.

use crate::{QuantError, Result};
use candle_core::quantized::QTensor;
use candle_core::{Device, Tensor};
use half::f16;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use shrink_core::iquant::IQuant;
use shrink_io::ggml::{to_candle, GgmlType};

/// Weights per super-block.
pub const QK_K: usize = 256;

/// A k-quant block type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum KQuant {
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
}

/// One group's grid inside a block: `value = a·(q − offset) − m` for codes `0..=qmax`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Affine {
    pub a: f32,
    pub m: f32,
    pub offset: f32,
    pub qmax: u8,
}

impl Affine {
    /// The nearest code to `x` on this grid, and its value.
    pub fn nearest(&self, x: f32) -> (u8, f32) {
        let q = if self.a != 0.0 {
            ((x + self.m) / self.a + self.offset)
                .round()
                .clamp(0.0, self.qmax as f32) as u8
        } else {
            self.offset as u8
        };
        (q, self.value(q))
    }

    pub fn value(&self, q: u8) -> f32 {
        self.a * (q as f32 - self.offset) - self.m
    }
}

/// One k-quant block's scales as stored: `value = d·sc·(q − offset) − dmin·mn` per group.
#[derive(Debug, Clone, PartialEq)]
pub struct KScales {
    pub d: f16,
    /// Zero for the types without minima (Q3_K, Q6_K).
    pub dmin: f16,
    /// Each group's integer scale.
    pub sc: Vec<i32>,
    /// Each group's integer minimum (zero for the types without minima).
    pub mn: Vec<i32>,
}

impl KQuant {
    pub const ALL: [KQuant; 5] = [
        KQuant::Q2K,
        KQuant::Q3K,
        KQuant::Q4K,
        KQuant::Q5K,
        KQuant::Q6K,
    ];

    pub fn ggml(self) -> GgmlType {
        match self {
            KQuant::Q2K => GgmlType::Q2K,
            KQuant::Q3K => GgmlType::Q3K,
            KQuant::Q4K => GgmlType::Q4K,
            KQuant::Q5K => GgmlType::Q5K,
            KQuant::Q6K => GgmlType::Q6K,
        }
    }

    pub fn from_ggml(dtype: GgmlType) -> Option<Self> {
        KQuant::ALL.into_iter().find(|k| k.ggml() == dtype)
    }

    pub fn name(self) -> &'static str {
        match self {
            KQuant::Q2K => "q2_k",
            KQuant::Q3K => "q3_k",
            KQuant::Q4K => "q4_k",
            KQuant::Q5K => "q5_k",
            KQuant::Q6K => "q6_k",
        }
    }

    /// Bytes per super-block.
    pub fn block_bytes(self) -> usize {
        self.ggml().type_size()
    }

    pub fn bits(self) -> u8 {
        match self {
            KQuant::Q2K => 2,
            KQuant::Q3K => 3,
            KQuant::Q4K => 4,
            KQuant::Q5K => 5,
            KQuant::Q6K => 6,
        }
    }

    /// Weights per group sharing one scale.
    pub fn group(self) -> usize {
        match self {
            KQuant::Q4K | KQuant::Q5K => 32,
            _ => 16,
        }
    }

    /// The range of a group's integer scale: `value = d·scale·(q − offset) − dmin·min`.
    pub fn scale_range(self) -> (i32, i32) {
        match self {
            KQuant::Q2K => (0, 15),
            KQuant::Q3K => (-32, 31),
            KQuant::Q4K | KQuant::Q5K => (0, 63),
            KQuant::Q6K => (-128, 127),
        }
    }

    /// The largest integer minimum, for the types that have one (Q2_K, Q4_K, Q5_K).
    pub fn min_max(self) -> Option<i32> {
        match self {
            KQuant::Q2K => Some(15),
            KQuant::Q4K | KQuant::Q5K => Some(63),
            KQuant::Q3K | KQuant::Q6K => None,
        }
    }

    /// The code that stands for zero (Q3_K's and Q6_K's codes are signed values plus it).
    pub fn offset(self) -> f32 {
        match self {
            KQuant::Q3K => 4.0,
            KQuant::Q6K => 32.0,
            _ => 0.0,
        }
    }

    /// Where a block stores its super-block scale and (for the types with minima) minimum.
    fn super_at(self) -> (usize, Option<usize>) {
        match self {
            KQuant::Q2K => (80, Some(82)),
            KQuant::Q3K => (108, None),
            KQuant::Q4K | KQuant::Q5K => (0, Some(2)),
            KQuant::Q6K => (208, None),
        }
    }

    /// One block's scales as stored: the super-block's `d` and `dmin` and each group's integer
    /// scale and minimum (zero for the types without minima).
    pub fn scales(self, b: &[u8]) -> KScales {
        let n = QK_K / self.group();
        let (at_d, at_min) = self.super_at();
        let (sc, mn) = (0..n)
            .map(|g| match self {
                KQuant::Q2K => ((b[g] & 15) as i32, (b[g] >> 4) as i32),
                KQuant::Q3K => {
                    let s = &b[96..108];
                    let low = if g < 8 { s[g] & 15 } else { s[g - 8] >> 4 };
                    let high = (s[8 + g % 4] >> (2 * (g / 4))) & 3;
                    ((low | high << 4) as i32 - 32, 0)
                }
                KQuant::Q4K | KQuant::Q5K => {
                    let s = &b[4..16];
                    let (sc, mn) = if g < 4 {
                        (s[g] & 63, s[g + 4] & 63)
                    } else {
                        (
                            (s[g + 4] & 15) | (s[g - 4] >> 6) << 4,
                            (s[g + 4] >> 4) | (s[g] >> 6) << 4,
                        )
                    };
                    (sc as i32, mn as i32)
                }
                KQuant::Q6K => (b[192 + g] as i8 as i32, 0),
            })
            .unzip();
        KScales {
            d: f16::from_le_bytes([b[at_d], b[at_d + 1]]),
            dmin: at_min.map_or(f16::ZERO, |at| f16::from_le_bytes([b[at], b[at + 1]])),
            sc,
            mn,
        }
    }

    /// Writes one block's scales (the inverse of [`scales`](Self::scales)), keeping its codes.
    /// Integer scales and minima must lie in [`scale_range`](Self::scale_range) and
    /// `0..=`[`min_max`](Self::min_max).
    pub fn write_scales(self, b: &mut [u8], s: &KScales) {
        let n = QK_K / self.group();
        let (lo, hi) = self.scale_range();
        debug_assert!(s.sc.len() == n && s.mn.len() == n, "{self:?}: {n} groups");
        debug_assert!(
            s.sc.iter().all(|x| (lo..=hi).contains(x)),
            "{self:?} {:?}",
            s.sc
        );
        debug_assert!(
            s.mn.iter()
                .all(|&x| (0..=self.min_max().unwrap_or(0)).contains(&x)),
            "{self:?} {:?}",
            s.mn
        );
        let (at_d, at_min) = self.super_at();
        b[at_d..at_d + 2].copy_from_slice(&s.d.to_le_bytes());
        if let Some(at) = at_min {
            b[at..at + 2].copy_from_slice(&s.dmin.to_le_bytes());
        }
        match self {
            KQuant::Q2K => {
                for ((b, &sc), &mn) in b[..16].iter_mut().zip(&s.sc).zip(&s.mn) {
                    *b = (sc as u8 & 15) | (mn as u8 & 15) << 4;
                }
            }
            KQuant::Q3K => {
                let t = &mut b[96..108];
                t.fill(0);
                for g in 0..16 {
                    let v = (s.sc[g] + 32) as u8;
                    t[g % 8] |= (v & 15) << (4 * (g / 8));
                    t[8 + g % 4] |= (v >> 4 & 3) << (2 * (g / 4));
                }
            }
            KQuant::Q4K | KQuant::Q5K => {
                let t = &mut b[4..16];
                t.fill(0);
                for g in 0..8 {
                    let (sc, mn) = (s.sc[g] as u8 & 63, s.mn[g] as u8 & 63);
                    if g < 4 {
                        t[g] |= sc;
                        t[g + 4] |= mn;
                    } else {
                        t[g + 4] = (sc & 15) | (mn & 15) << 4;
                        t[g - 4] |= (sc >> 4) << 6;
                        t[g] |= (mn >> 4) << 6;
                    }
                }
            }
            KQuant::Q6K => {
                for (b, &sc) in b[192..208].iter_mut().zip(&s.sc) {
                    *b = sc as i8 as u8;
                }
            }
        }
    }

    /// The per-group grids of one block.
    pub fn grids(self, b: &[u8]) -> Vec<Affine> {
        let s = self.scales(b);
        let qmax = ((1u32 << self.bits()) - 1) as u8;
        let (d, dmin) = (s.d.to_f32(), s.dmin.to_f32());
        s.sc.iter()
            .zip(&s.mn)
            .map(|(&sc, &mn)| Affine {
                a: d * sc as f32,
                m: dmin * mn as f32,
                offset: self.offset(),
                qmax,
            })
            .collect()
    }

    /// Writes 256 codes into a block, keeping its scales.
    pub fn write_codes(self, b: &mut [u8], codes: &[u8]) {
        debug_assert_eq!(codes.len(), QK_K);
        match self {
            KQuant::Q2K => {
                b[16..80].fill(0);
                for (y, &c) in codes.iter().enumerate() {
                    let (n, j, l) = (y / 128, (y % 128) / 32, y % 32);
                    b[16 + 32 * n + l] |= (c & 3) << (2 * j);
                }
            }
            KQuant::Q3K => {
                b[..96].fill(0);
                for (y, &c) in codes.iter().enumerate() {
                    let (n, j, l) = (y / 128, (y % 128) / 32, y % 32);
                    b[32 + 32 * n + l] |= (c & 3) << (2 * j);
                    b[l] |= (c >> 2 & 1) << (4 * n + j);
                }
            }
            KQuant::Q4K => {
                for j in 0..4 {
                    for l in 0..32 {
                        b[16 + 32 * j + l] = codes[64 * j + l] | codes[64 * j + 32 + l] << 4;
                    }
                }
            }
            KQuant::Q5K => {
                b[16..48].fill(0);
                for j in 0..4 {
                    for l in 0..32 {
                        let (lo, hi) = (codes[64 * j + l], codes[64 * j + 32 + l]);
                        b[48 + 32 * j + l] = (lo & 15) | (hi & 15) << 4;
                        b[16 + l] |= (lo >> 4) << (2 * j) | (hi >> 4) << (2 * j + 1);
                    }
                }
            }
            KQuant::Q6K => {
                for n in 0..2 {
                    let (y, ql, qh) = (128 * n, 64 * n, 128 + 32 * n);
                    for l in 0..32 {
                        let c = [
                            codes[y + l],
                            codes[y + l + 32],
                            codes[y + l + 64],
                            codes[y + l + 96],
                        ];
                        b[ql + l] = (c[0] & 15) | (c[2] & 15) << 4;
                        b[ql + l + 32] = (c[1] & 15) | (c[3] & 15) << 4;
                        b[qh + l] =
                            c[0] >> 4 | (c[1] >> 4) << 2 | (c[2] >> 4) << 4 | (c[3] >> 4) << 6;
                    }
                }
            }
        }
    }
}

/// A block type whose codes GPTQ chooses inside scales fixed per block: a k-quant (affine grids
/// per group) or an i-quant (a codebook under one scale per 32 weights, or a grid point and
/// signs per eight weights).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CodeBlocks {
    K(KQuant),
    I(IQuant),
}

/// The values one group of a block can take.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum CodeGrid {
    Affine(Affine),
    /// The i-quants' non-linear codebook times a scale.
    Book(f32),
    /// A grid type's points and signs for eight weights, times a scale.
    Octet(IQuant, f32),
}

impl CodeGrid {
    /// The code of the next [`CodeBlocks::code_len`] weights `x` nearest them in the
    /// `w`-weighted error (a code of one weight: simply the nearest), and its values.
    pub fn nearest(&self, x: &[f32], w: &[f32], values: &mut [f32]) -> u32 {
        let one = |(q, v): (u8, f32), values: &mut [f32]| {
            values[0] = v;
            q as u32
        };
        match self {
            CodeGrid::Affine(a) => one(a.nearest(x[0]), values),
            CodeGrid::Book(d) => one(crate::iquant::nearest(*d, x[0]), values),
            CodeGrid::Octet(q, d) => {
                let (code, v) = crate::iquant::nearest_octet(*q, *d, x, w);
                values.copy_from_slice(&v);
                code
            }
        }
    }
}

impl CodeBlocks {
    pub fn ggml(self) -> GgmlType {
        match self {
            CodeBlocks::K(k) => k.ggml(),
            CodeBlocks::I(q) => GgmlType::of_iquant(q),
        }
    }

    /// Weights per block.
    pub fn block_len(self) -> usize {
        self.ggml().block_size()
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        self.ggml().type_size()
    }

    /// Weights per group sharing one grid.
    pub fn group(self) -> usize {
        match self {
            CodeBlocks::K(k) => k.group(),
            CodeBlocks::I(q) if crate::iquant::is_grid(q) => crate::iquant::OCTET,
            CodeBlocks::I(_) => 32,
        }
    }

    /// Weights one code stands for: eight in the grid types, else one.
    pub fn code_len(self) -> usize {
        match self {
            CodeBlocks::I(q) if crate::iquant::is_grid(q) => crate::iquant::OCTET,
            _ => 1,
        }
    }

    /// The per-group grids of one block.
    pub fn grids(self, b: &[u8]) -> Vec<CodeGrid> {
        match self {
            CodeBlocks::K(k) => k.grids(b).into_iter().map(CodeGrid::Affine).collect(),
            CodeBlocks::I(q) if crate::iquant::is_grid(q) => crate::iquant::octet_scales(q, b)
                .into_iter()
                .map(|d| CodeGrid::Octet(q, d))
                .collect(),
            CodeBlocks::I(q) => crate::iquant::sub_scales(q, b)
                .into_iter()
                .map(CodeGrid::Book)
                .collect(),
        }
    }

    /// Writes one block's codes (one per [`code_len`](Self::code_len) weights), keeping its
    /// scales.
    pub fn write_codes(self, b: &mut [u8], codes: &[u32]) {
        let bytes = || codes.iter().map(|&c| c as u8).collect::<Vec<u8>>();
        match self {
            CodeBlocks::K(k) => k.write_codes(b, &bytes()),
            CodeBlocks::I(q) if crate::iquant::is_grid(q) => {
                crate::iquant::write_octets(q, b, codes)
            }
            CodeBlocks::I(q) => crate::iquant::write_indices(q, b, &bytes()),
        }
    }
}

/// Checks that `w` is a finite `rows × cols` matrix whose rows hold whole `dtype` blocks.
pub(crate) fn check(
    w: &[f32],
    rows: usize,
    cols: usize,
    dtype: GgmlType,
    name: &str,
) -> Result<()> {
    shrink_core::check_matrix(w, rows, cols, name)?;
    if !cols.is_multiple_of(dtype.block_size()) {
        return Err(QuantError::Shape {
            tensor: name.to_string(),
            message: format!(
                "{dtype:?} needs rows that are a multiple of {} values, this one has {cols}",
                dtype.block_size()
            ),
        });
    }
    Ok(())
}

/// A weight matrix stored as ggml blocks (legacy, k-quant or i-quant), row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct GgmlTensor {
    pub dtype: GgmlType,
    pub rows: usize,
    pub cols: usize,
    pub bytes: Vec<u8>,
}

impl GgmlTensor {
    /// Quantizes by ggml's reference quantizer (candle's port; shrink's for i-quants); with
    /// `importance` (one weight per input column, e.g. mean squared activation) by the
    /// importance-weighted one, as llama.cpp's `--imatrix`. Importance weighting exists for the
    /// k-quants and i-quants.
    pub fn quantize(
        w: &[f32],
        rows: usize,
        cols: usize,
        dtype: GgmlType,
        importance: Option<&[f32]>,
        name: &str,
    ) -> Result<Self> {
        check(w, rows, cols, dtype, name)?;
        if let Some(imp) = importance.filter(|imp| imp.len() != cols) {
            return Err(QuantError::Shape {
                tensor: name.to_string(),
                message: format!("{} importance weights for rows of {cols}", imp.len()),
            });
        }
        if let Some(kind) = dtype.iquant() {
            let row_bytes = kind.row_bytes(cols);
            let mut bytes = vec![0u8; rows * row_bytes];
            bytes
                .par_chunks_mut(row_bytes)
                .zip(w.par_chunks(cols))
                .for_each(|(out, row)| crate::iquant::quantize_row(kind, row, importance, out));
            return Ok(Self {
                dtype,
                rows,
                cols,
                bytes,
            });
        }
        let candle = to_candle(dtype).ok_or_else(|| {
            QuantError::Scheme(format!("{dtype:?} blocks cannot be quantized here"))
        })?;
        let t = Tensor::from_slice(w, (rows, cols), &Device::Cpu)?;
        let q = match importance {
            None => QTensor::quantize(&t, candle)?,
            Some(imp) if KQuant::from_ggml(dtype).is_some() => {
                QTensor::quantize_imatrix(&t, imp, candle)?
            }
            Some(_) => {
                return Err(QuantError::Scheme(format!(
                    "importance-weighted quantization to {dtype:?} goes through the grid schemes, not ggml blocks"
                )))
            }
        };
        Ok(Self {
            dtype,
            rows,
            cols,
            bytes: q.data()?.to_vec(),
        })
    }

    /// The weights as llama.cpp reads them (candle's dequantizer, shrink's for i-quants).
    pub fn dequantize(&self) -> Result<Vec<f32>> {
        let t = shrink_io::ggml::dequantize(self.dtype, &self.bytes, &[self.rows, self.cols])?;
        Ok(t.flatten_all()?.to_vec1()?)
    }

    /// The fraction of weights whose value is exactly zero: counted in the blocks for the legacy
    /// types (Q4_0 … Q8_0), from the dequantized weights for the others.
    pub fn zero_fraction(&self) -> Result<f64> {
        let Some(scheme) = crate::QuantScheme::of_ggml(self.dtype) else {
            return Ok(crate::zero_fraction(&self.dequantize()?));
        };
        let zeros: usize = self
            .bytes
            .par_chunks(self.dtype.type_size())
            .with_min_len(256)
            .map(|block| {
                let (codes, scale, min) = crate::tensor::decode_block(self.dtype, block);
                let params = crate::grid::GroupParams::from_stored(scale, min);
                let value = scheme.grid.decoder(scheme.bits, &params);
                codes.iter().filter(|&&c| value(c) == 0.0).count()
            })
            .sum();
        Ok(zeros as f64 / (self.rows * self.cols).max(1) as f64)
    }

    pub fn size_bytes(&self) -> usize {
        self.bytes.len()
    }

    pub fn bits_per_weight(&self) -> f64 {
        self.bytes.len() as f64 * 8.0 / (self.rows * self.cols) as f64
    }
}

#[cfg(test)]
mod tests;
