//! Products with ggml-quantized weights, computed as llama.cpp's CPU backend computes them: each
//! row of activations is rounded into the 8-bit blocks llama.cpp pairs with the weight's type
//! (`q8_0` for Q4_0/Q5_0/Q8_0/IQ4_NL, `q8_1` for Q4_1/Q5_1, `q8_K` for the k-quants and the
//! other i-quants, with llama.cpp's scales and its round-half-to-even), and every block's product
//! is an exact integer dot product of the codes (an i-quant's codes are its codebook or grid
//! values with their signs), scaled once by the two blocks' scales (and corrected by the weight's
//! minimum).
//! What differs from llama.cpp is only the order in which the blocks' float terms are added.
//!
//! The terms of one output are added in one fixed order — block after block, each a fused
//! multiply-add — whatever kernel runs them (AVX-512 VNNI, or the portable loop) and however many
//! threads: the bits do not depend on the CPU. They do depend on nothing else but the weights and
//! that output's own activation row.
//!
//! ```
//! use shrink_core::qmatmul::{BlockType, QMatrix};
//! // One row of 32 weights as a Q8_0 block: scale 0.5 (f16 0x3800), codes 0..32.
//! let mut block = vec![0x00, 0x38];
//! block.extend((0..32u8).map(|c| c as u8));
//! let w = QMatrix::new(BlockType::Q8_0, 1, 32, block).unwrap();
//! // The activations are all 1: rounded to q8_0 they are exact (code 127, scale 1/127).
//! let y = w.matmul(&[1.0; 32], 1);
//! let exact: f32 = (0..32).map(|c| 0.5 * c as f32).sum();
//! assert!((y[0] - exact).abs() < 1e-3 * exact);
//! ```

use decoded::Decoded;
use half::f16;
use rayon::prelude::*;

mod decoded;
mod kernel;

/// A ggml block type whose products shrink computes with integer dot products.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BlockType {
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    IQ4NL,
    IQ4XS,
    IQ3XXS,
    IQ3S,
    IQ2XXS,
    IQ2XS,
    IQ2S,
}

/// The 8-bit blocks llama.cpp rounds a weight type's activations into.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ActType {
    /// 32 values, scale `max|x| / 127` stored in f16.
    Q8_0,
    /// `Q8_0` with the f16 sum `d · Σq` beside it (for the types with a minimum).
    Q8_1,
    /// 256 values, f32 scale `max / -127` signed by the largest value.
    Q8K,
}

/// How a type's minimum enters the product.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mins {
    None,
    /// `m` per block, times the activation block's stored `d · Σq` (Q4_1, Q5_1).
    PerBlock,
    /// An integer minimum per sub-block, times `dmin` and the activation's sub-block sums.
    PerSub,
}

impl BlockType {
    /// Every type, in ggml's numbering order.
    pub const ALL: [BlockType; 17] = [
        BlockType::Q4_0,
        BlockType::Q4_1,
        BlockType::Q5_0,
        BlockType::Q5_1,
        BlockType::Q8_0,
        BlockType::Q2K,
        BlockType::Q3K,
        BlockType::Q4K,
        BlockType::Q5K,
        BlockType::Q6K,
        BlockType::IQ2XXS,
        BlockType::IQ2XS,
        BlockType::IQ3XXS,
        BlockType::IQ4NL,
        BlockType::IQ3S,
        BlockType::IQ2S,
        BlockType::IQ4XS,
    ];

    /// The type of ggml's numbering (`ggml_type`), if shrink computes with it.
    pub fn from_ggml(id: u32) -> Option<BlockType> {
        Some(match id {
            2 => BlockType::Q4_0,
            3 => BlockType::Q4_1,
            6 => BlockType::Q5_0,
            7 => BlockType::Q5_1,
            8 => BlockType::Q8_0,
            10 => BlockType::Q2K,
            11 => BlockType::Q3K,
            12 => BlockType::Q4K,
            13 => BlockType::Q5K,
            14 => BlockType::Q6K,
            16 => BlockType::IQ2XXS,
            17 => BlockType::IQ2XS,
            18 => BlockType::IQ3XXS,
            20 => BlockType::IQ4NL,
            21 => BlockType::IQ3S,
            22 => BlockType::IQ2S,
            23 => BlockType::IQ4XS,
            _ => return None,
        })
    }

    /// Weights per block.
    pub fn block_len(self) -> usize {
        match self {
            BlockType::Q4_0 | BlockType::Q4_1 | BlockType::Q5_0 | BlockType::Q5_1 => 32,
            BlockType::Q8_0 | BlockType::IQ4NL => 32,
            _ => 256,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            BlockType::Q4_0 => 18,
            BlockType::Q4_1 => 20,
            BlockType::Q5_0 => 22,
            BlockType::Q5_1 => 24,
            BlockType::Q8_0 => 34,
            BlockType::Q2K => 84,
            BlockType::Q3K => 110,
            BlockType::Q4K => 144,
            BlockType::Q5K => 176,
            BlockType::Q6K => 210,
            BlockType::IQ4NL => 18,
            BlockType::IQ4XS => 136,
            BlockType::IQ3XXS => 98,
            BlockType::IQ3S => 110,
            BlockType::IQ2XXS => 66,
            BlockType::IQ2XS => 74,
            BlockType::IQ2S => 82,
        }
    }

    /// Weights per sub-block (one integer scale each).
    fn sub_len(self) -> usize {
        match self {
            BlockType::Q2K | BlockType::Q3K | BlockType::Q6K => 16,
            BlockType::IQ2XS | BlockType::IQ2S => 16,
            _ => 32,
        }
    }

    /// What the unsigned codes are shifted by: a weight is `scale · (code − offset)`.
    fn offset(self) -> i32 {
        match self {
            BlockType::Q4_0 => 8,
            BlockType::Q5_0 => 16,
            BlockType::Q8_0 => 128,
            // The i-quants' signed codebook values, shifted to be unsigned.
            BlockType::IQ4NL | BlockType::IQ4XS | BlockType::IQ3XXS | BlockType::IQ3S => 128,
            BlockType::IQ2XXS | BlockType::IQ2XS | BlockType::IQ2S => 128,
            BlockType::Q3K => 4,
            BlockType::Q6K => 32,
            _ => 0,
        }
    }

    /// The width of the unsigned codes the panels hold.
    fn code_bits(self) -> u32 {
        match self {
            BlockType::Q2K => 2,
            BlockType::Q3K => 3,
            BlockType::Q4_0 | BlockType::Q4_1 | BlockType::Q4K => 4,
            BlockType::Q5_0 | BlockType::Q5_1 | BlockType::Q5K => 5,
            BlockType::Q6K => 6,
            BlockType::Q8_0 => 8,
            BlockType::IQ4NL | BlockType::IQ4XS | BlockType::IQ3XXS | BlockType::IQ3S => 8,
            BlockType::IQ2XXS | BlockType::IQ2XS | BlockType::IQ2S => 8,
        }
    }

    /// The power of two every product is scaled by at the end (the grid i-quants hold their
    /// sub-block scales as odd integers `2·ls + 1`: ggml's `(0.5 + ls) · 0.5` or `· 0.25`).
    fn factor(self) -> f32 {
        match self {
            BlockType::IQ3XXS => 0.25,
            BlockType::IQ2XXS | BlockType::IQ2XS | BlockType::IQ2S => 0.125,
            _ => 1.0,
        }
    }

    fn act(self) -> ActType {
        match self {
            BlockType::Q4_0 | BlockType::Q5_0 | BlockType::Q8_0 | BlockType::IQ4NL => ActType::Q8_0,
            BlockType::Q4_1 | BlockType::Q5_1 => ActType::Q8_1,
            _ => ActType::Q8K,
        }
    }

    fn mins(self) -> Mins {
        match self {
            BlockType::Q4_1 | BlockType::Q5_1 => Mins::PerBlock,
            BlockType::Q2K | BlockType::Q4K | BlockType::Q5K => Mins::PerSub,
            _ => Mins::None,
        }
    }
}

/// Why a packed matrix was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum QMatrixError {
    #[error("{ty:?} rows hold whole blocks of {block} weights, not {cols}")]
    Ragged {
        ty: BlockType,
        block: usize,
        cols: usize,
    },
    #[error("{rows} × {cols} {ty:?} weights take {expected} bytes, not {actual}")]
    Size {
        ty: BlockType,
        rows: usize,
        cols: usize,
        expected: usize,
        actual: usize,
    },
}

/// A `rows × cols` weight matrix (a linear layer's `out × in`) stored in ggml blocks, row after
/// row, as a GGUF file holds it, beside its codes taken apart once for the kernels (one byte a
/// weight, rows in panels of [`LANES`]).
#[derive(Clone, Debug)]
pub struct QMatrix {
    ty: BlockType,
    rows: usize,
    cols: usize,
    data: Vec<u8>,
    panels: RowPanels,
}

impl PartialEq for QMatrix {
    fn eq(&self, other: &Self) -> bool {
        (self.ty, self.rows, self.cols) == (other.ty, other.rows, other.cols)
            && self.data == other.data
    }
}

impl QMatrix {
    /// Checks that `data` holds `rows` rows of `cols` weights in whole blocks of `ty`.
    pub fn new(
        ty: BlockType,
        rows: usize,
        cols: usize,
        data: Vec<u8>,
    ) -> Result<Self, QMatrixError> {
        let block = ty.block_len();
        if !cols.is_multiple_of(block) {
            return Err(QMatrixError::Ragged { ty, block, cols });
        }
        let expected = rows * cols / block * ty.block_bytes();
        if data.len() != expected {
            return Err(QMatrixError::Size {
                ty,
                rows,
                cols,
                expected,
                actual: data.len(),
            });
        }
        let mut m = QMatrix {
            ty,
            rows,
            cols,
            data,
            panels: RowPanels::default(),
        };
        m.panels = RowPanels::of(&m);
        Ok(m)
    }

    pub fn block_type(&self) -> BlockType {
        self.ty
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The stored blocks.
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    fn row_bytes(&self) -> usize {
        self.cols / self.ty.block_len() * self.ty.block_bytes()
    }

    /// The same matrix with its rows reordered: row `i` of the result is row `order[i]` of this
    /// one (`order` must be a permutation of the rows).
    pub fn permute_rows(&self, order: &[usize]) -> Self {
        assert_eq!(order.len(), self.rows, "one index per row");
        let rb = self.row_bytes();
        let data = order
            .iter()
            .flat_map(|&r| &self.data[r * rb..(r + 1) * rb])
            .copied()
            .collect();
        let mut m = QMatrix {
            data,
            panels: RowPanels::default(),
            ..*self
        };
        m.panels = RowPanels::of(&m);
        m
    }

    /// The weights as f32, row-major (ggml's dequantization).
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        let mut row = Decoded::new(self.ty, self.cols);
        for (r, chunk) in out.chunks_mut(self.cols).enumerate() {
            row.decode(self.ty, self.row(r));
            row.values(self.ty, chunk);
        }
        out
    }

    fn row(&self, r: usize) -> &[u8] {
        let rb = self.row_bytes();
        &self.data[r * rb..(r + 1) * rb]
    }

    /// `y = x · Wᵀ` for `t` rows of activations `x` (`t × cols`, row-major): `t × rows`,
    /// row-major. Each activation row is rounded to the type's 8-bit blocks first, as llama.cpp
    /// does.
    pub fn matmul(&self, x: &[f32], t: usize) -> Vec<f32> {
        self.matmul_with(kernel::Kernel::current(), x, t)
    }

    fn matmul_with(&self, kernel: kernel::Kernel, x: &[f32], t: usize) -> Vec<f32> {
        assert_eq!(x.len(), t * self.cols, "activations are t × cols");
        let mut acts = Activations::quantize(self.ty.act(), x, t, self.cols);
        acts.sub_sums(self.ty.sub_len(), self.ty.offset());
        // Each panel of LANES weight rows against every token, panels on rayon's threads.
        let n = self.rows;
        // Panels shared out in runs of at least ~64k products, so that a token's decoding step
        // is not spent handing out tiny tasks. Each panel writes its own columns of `y`.
        let per_panel = t * self.cols * LANES;
        let mut y = vec![0f32; t * n];
        let out = Columns(y.as_mut_ptr());
        (0..self.panels.count)
            .into_par_iter()
            .with_min_len((1 << 16) / per_panel.max(1))
            .for_each_init(
                || (vec![0f32; t * LANES], Vec::new()),
                |(lanes, scratch), p| {
                    kernel::panel(kernel, self.ty, &self.panels, p, &acts, lanes, scratch);
                    let rows = (n - p * LANES).min(LANES);
                    for (tok, v) in lanes.chunks(LANES).enumerate() {
                        // SAFETY: `y` holds t × n values; panel p alone writes columns
                        // p·LANES .. p·LANES + rows of each token's row.
                        unsafe { out.write(tok * n + p * LANES, &v[..rows]) };
                    }
                },
            );
        let factor = self.ty.factor();
        if factor != 1.0 {
            // A power of two: exact.
            y.iter_mut().for_each(|v| *v *= factor);
        }
        y
    }
}

/// Where the panels write their columns of the output, from several threads at once (each panel
/// its own columns).
#[derive(Clone, Copy)]
struct Columns(*mut f32);

// SAFETY: the threads write disjoint parts (see `matmul_with`) of an output that outlives them.
unsafe impl Send for Columns {}
unsafe impl Sync for Columns {}

impl Columns {
    /// # Safety
    /// `at + v.len()` must lie within the output and no other thread may touch that range.
    unsafe fn write(self, at: usize, v: &[f32]) {
        // SAFETY: as the caller promises.
        unsafe { std::ptr::copy_nonoverlapping(v.as_ptr(), self.0.add(at), v.len()) };
    }
}

/// Every row's codes, scales and minima, [`LANES`] rows side by side: for each step of 4 codes,
/// the panel's rows' 4 codes one after the other (64 bytes); for each sub-block and block, the
/// rows' scales. Codes below 16 ([`RowPanels::nibbles`]) are held two to a byte: each 64 bytes
/// carry two steps, the even one in the low halves. Rows past the matrix's last are zero.
#[derive(Clone, Debug, Default)]
struct RowPanels {
    count: usize,
    /// Whether codes are held as 4-bit halves of bytes.
    nibbles: bool,
    /// Per panel: `cols / 4` steps × `LANES` rows × 4 codes (half a byte each with `nibbles`).
    codes: Vec<u8>,
    /// Per panel, per sub-block: `LANES` integer scales (1 for the types without).
    scales: Vec<i8>,
    /// Per panel, per sub-block: `LANES` integer minima (the k-quants with minima).
    mins: Vec<i8>,
    /// Per panel, per block: `LANES` scales (every type's are f16).
    d: Vec<f16>,
    /// Per panel, per block: `LANES` minimum scales (or Q4_1/Q5_1's minima), f16 too.
    dmin: Vec<f16>,
}

impl RowPanels {
    fn of(m: &QMatrix) -> Self {
        let (ty, cols) = (m.ty, m.cols);
        let count = m.rows.div_ceil(LANES);
        let (steps, subs, blocks) = (cols / 4, cols / ty.sub_len(), cols / ty.block_len());
        let nibbles = ty.code_bits() <= 4;
        let panel_bytes = steps * LANES * 4 / if nibbles { 2 } else { 1 };
        let mut p = RowPanels {
            count,
            nibbles,
            codes: vec![0; count * panel_bytes],
            scales: vec![0; count * subs * LANES],
            mins: vec![0; count * subs * LANES],
            d: vec![f16::ZERO; count * blocks * LANES],
            dmin: vec![f16::ZERO; count * blocks * LANES],
        };
        if count == 0 || cols == 0 {
            return p;
        }
        // Panels taken apart in parallel, each from its own rows.
        let sub_lanes = subs * LANES;
        let block_lanes = blocks * LANES;
        p.codes
            .par_chunks_mut(panel_bytes)
            .zip(p.scales.par_chunks_mut(sub_lanes))
            .zip(p.mins.par_chunks_mut(sub_lanes))
            .zip(p.d.par_chunks_mut(block_lanes))
            .zip(p.dmin.par_chunks_mut(block_lanes))
            .enumerate()
            .for_each(|(panel, ((((codes, scales), mins), d), dmin))| {
                let mut row = Decoded::new(ty, cols);
                for lane in 0..LANES.min(m.rows - panel * LANES) {
                    row.decode(ty, m.row(panel * LANES + lane));
                    for (step, c) in row.codes.chunks(4).enumerate() {
                        let (pair, shift) = match nibbles {
                            true => (step / 2, 4 * (step % 2)),
                            false => (step, 0),
                        };
                        let at = (pair * LANES + lane) * 4;
                        for (to, &c) in codes[at..at + 4].iter_mut().zip(c) {
                            *to |= c << shift;
                        }
                    }
                    for j in 0..subs {
                        // Every type's sub-block scales and minima lie in -32..=63.
                        scales[j * LANES + lane] = row.scales[j] as i8;
                        mins[j * LANES + lane] = row.mins[j] as i8;
                    }
                    for b in 0..blocks {
                        // Read from f16: held exactly.
                        d[b * LANES + lane] = f16::from_f32(row.d[b]);
                        dmin[b * LANES + lane] = f16::from_f32(row.dmin[b]);
                    }
                }
            });
        p
    }

    /// Panel `p`'s codes (`steps` = columns / 4).
    fn panel_codes(&self, p: usize, steps: usize) -> &[u8] {
        let len = steps * LANES * 4 / if self.nibbles { 2 } else { 1 };
        &self.codes[p * len..(p + 1) * len]
    }

    /// The code of column `k` of lane `lane` in panel `p` (`steps` = columns / 4).
    fn code(&self, p: usize, steps: usize, k: usize, lane: usize) -> u8 {
        let step = p * steps + k / 4;
        match self.nibbles {
            true => self.codes[((step / 2) * LANES + lane) * 4 + k % 4] >> (4 * (step % 2)) & 15,
            false => self.codes[(step * LANES + lane) * 4 + k % 4],
        }
    }
}

/// Weight rows per panel: one 512-bit vector of i32 lanes.
const LANES: usize = 16;

/// Activation rows rounded to 8-bit blocks, token after token.
struct Activations {
    /// `t × cols` codes.
    codes: Vec<i8>,
    /// Per token, per block of the activation type: the scale.
    d: Vec<f32>,
    /// Per token, per 16 codes: their sum.
    sums: Vec<i32>,
    /// Q8_1 only: per token, per block: the f16-rounded `d · Σq`.
    s: Vec<f32>,
    /// Per token, per sub-block of the weight type: the codes' sum, and that sum times the
    /// negated offset of the weight's codes ([`Activations::sub_sums`]).
    qsum: Vec<i32>,
    start: Vec<i32>,
    t: usize,
    cols: usize,
}

/// Rounds to the nearest integer, ties to even (the x86 `cvtps` that llama.cpp's AVX paths use),
/// by llama.cpp's `nearest_int`: adding 1.5 · 2²³ leaves the rounded value in the low mantissa
/// bits. Exact for |v| < 2²², which the ±127-scaled activations are.
fn round_even(v: f32) -> i32 {
    debug_assert!(v.abs() < (1 << 22) as f32);
    let bits = (v + 12_582_912.0).to_bits() as i32;
    (bits & 0x007f_ffff) - 0x0040_0000
}

impl ActType {
    fn block_len(self) -> usize {
        match self {
            ActType::Q8_0 | ActType::Q8_1 => 32,
            ActType::Q8K => 256,
        }
    }

    /// Rounds one block: writes the codes, returns the scale the dot product uses and (Q8_1)
    /// the stored sum term.
    fn quantize_block(self, x: &[f32], q: &mut [i8]) -> (f32, f32) {
        match self {
            ActType::Q8_0 | ActType::Q8_1 => {
                let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
                let d = amax / 127.0;
                let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
                let mut sum = 0i32;
                for (q, &v) in q.iter_mut().zip(x) {
                    *q = round_even(v * id) as i8;
                    sum += *q as i32;
                }
                let s = f16::from_f32(d * sum as f32).to_f32();
                (f16::from_f32(d).to_f32(), s)
            }
            ActType::Q8K => {
                let (mut amax, mut max) = (0f32, 0f32);
                for &v in x {
                    if v.abs() > amax {
                        amax = v.abs();
                        max = v;
                    }
                }
                if amax == 0.0 {
                    q.fill(0);
                    return (0.0, 0.0);
                }
                let iscale = -127.0 / max;
                for (q, &v) in q.iter_mut().zip(x) {
                    *q = round_even(iscale * v).min(127) as i8;
                }
                (1.0 / iscale, 0.0)
            }
        }
    }
}

impl Activations {
    fn quantize(act: ActType, x: &[f32], t: usize, cols: usize) -> Self {
        let bl = act.block_len();
        let (blocks, sixteens) = (cols / bl, cols / 16);
        let mut a = Activations {
            codes: vec![0; t * cols],
            d: vec![0.0; t * blocks],
            sums: vec![0; t * sixteens],
            s: vec![0.0; t * blocks],
            qsum: Vec::new(),
            start: Vec::new(),
            t,
            cols,
        };
        if t == 0 || cols == 0 {
            return a;
        }
        // Rows rounded in parallel, each on its own.
        let rows = a.codes.par_chunks_mut(cols).zip(a.d.par_chunks_mut(blocks));
        let rows = rows
            .zip(a.s.par_chunks_mut(blocks))
            .zip(a.sums.par_chunks_mut(sixteens));
        rows.zip(x.par_chunks(cols))
            .with_min_len((1 << 14) / cols)
            .for_each(|((((q, d), s), sums), row)| {
                for (b, (xb, qb)) in row.chunks(bl).zip(q.chunks_mut(bl)).enumerate() {
                    (d[b], s[b]) = act.quantize_block(xb, qb);
                }
                for (sum, q16) in sums.iter_mut().zip(q.chunks(16)) {
                    *sum = q16.iter().map(|&v| v as i32).sum();
                }
            });
        a
    }

    /// Per token, per sub-block of `g` codes of the weight type: the codes' sum, and that sum
    /// times `-offset` (the term that takes the weight codes' offset out of an integer dot
    /// product), as the VNNI kernel starts its sums from.
    fn sub_sums(&mut self, g: usize, offset: i32) {
        self.qsum = self.sums.chunks(g / 16).map(|c| c.iter().sum()).collect();
        self.start = self.qsum.iter().map(|&q| -offset * q).collect();
    }
}

#[cfg(test)]
mod tests;
