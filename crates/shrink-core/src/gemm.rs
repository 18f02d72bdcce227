//! f32 matrix products with one reduction order on every CPU.
//!
//! Every output is a single chain of fused multiply-adds over `k` in increasing order,
//! `c ← a_p · b_p + c` rounded once per step, starting from 0 (or from the output's own value when
//! accumulating). Tiling, the SIMD width (AVX-512, AVX2, or the portable loop), the thread count
//! and the machine's cache sizes change which core computes which outputs and how many at once,
//! never the terms of one output or their order: the bits are the same whatever runs them. A BLAS
//! (or candle's `gemm` crate) splits `k` into blocks sized from the caches and adds the blocks'
//! partial sums, so its bits depend on the machine; that is why shrink's calibration uses this.
//!
//! The kernel is picked at run time ([`Kernel::detect`]) and can be forced with the environment
//! variable `SHRINK_KERNEL` (`portable`, `avx2`, `avx512`), which tests use to compare bytes.
//!
//! ```
//! use shrink_core::gemm::{gemm, Operand};
//! // C (2 × 2) = A (2 × 3) · B (3 × 2), B given as its transpose (2 × 3, row-major), as a linear
//! // layer's weight is stored.
//! let a = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
//! let w = [1.0, 0.0, 1.0, 0.0, 1.0, 0.0];
//! let mut c = [0.0; 4];
//! gemm(2, 2, 3, Operand::row_major(&a, 3), Operand::transposed(&w, 3), &mut c, false);
//! assert_eq!(c, [4.0, 2.0, 10.0, 5.0]);
//! ```

use rayon::prelude::*;
use std::sync::OnceLock;

/// Rows of A per register tile.
const MR: usize = 12;
/// Columns of B per register tile (two 512-bit vectors, four 256-bit ones).
const NR: usize = 32;
/// Steps of `k` per pass over a B panel.
const KC: usize = 1024;
// The AVX-512 tile holds a row in two vectors, the AVX2 tile works in quarters of 4 rows.
const _: () = assert!(MR.is_multiple_of(4) && NR == 32);

/// A matrix read through strides: element `(r, c)` is `data[r * row_stride + c * col_stride]`.
#[derive(Clone, Copy, Debug)]
pub struct Operand<'a> {
    pub data: &'a [f32],
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a> Operand<'a> {
    /// A row-major matrix of `cols` columns.
    pub fn row_major(data: &'a [f32], cols: usize) -> Self {
        Self {
            data,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// The transpose of a row-major matrix of `cols` columns (a linear layer's `out × in`
    /// weight read as `in × out`).
    pub fn transposed(data: &'a [f32], cols: usize) -> Self {
        Self {
            data,
            row_stride: 1,
            col_stride: cols,
        }
    }

    /// Whether a `rows × cols` matrix read this way stays inside `data`.
    fn fits(&self, rows: usize, cols: usize) -> bool {
        rows == 0
            || cols == 0
            || (rows - 1) * self.row_stride + (cols - 1) * self.col_stride < self.data.len()
    }
}

/// The instruction set a product runs on. All give the same bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kernel {
    /// Scalar fused multiply-adds (`f32::mul_add`): any CPU.
    Portable,
    /// AVX2 with FMA.
    Avx2,
    /// AVX-512F (with FMA).
    Avx512,
}

impl Kernel {
    /// The widest kernel this CPU runs.
    pub fn detect() -> Kernel {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("fma")
            {
                return Kernel::Avx512;
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                return Kernel::Avx2;
            }
        }
        Kernel::Portable
    }

    /// Every kernel this CPU runs, narrowest first.
    pub fn available() -> Vec<Kernel> {
        [Kernel::Portable, Kernel::Avx2, Kernel::Avx512]
            .into_iter()
            .filter(|&k| k <= Kernel::detect())
            .collect()
    }

    /// The kernel `SHRINK_KERNEL` names, if it is set: an error for a name that is not one, or a
    /// kernel this CPU cannot run (what the command line checks before any work).
    pub fn from_env() -> Result<Option<Kernel>, String> {
        match std::env::var("SHRINK_KERNEL") {
            Ok(name) => Kernel::named(&name).map(Some),
            Err(_) => Ok(None),
        }
    }

    /// The kernel called `name` (`portable`, `avx2`, `avx512`), if this CPU runs it.
    pub fn named(name: &str) -> Result<Kernel, String> {
        let kernel = match name {
            "portable" => Kernel::Portable,
            "avx2" => Kernel::Avx2,
            "avx512" => Kernel::Avx512,
            _ => {
                return Err(format!(
                    "SHRINK_KERNEL={name}: expected portable, avx2 or avx512"
                ))
            }
        };
        if kernel > Kernel::detect() {
            return Err(format!(
                "SHRINK_KERNEL={name}: this CPU runs at most {:?}",
                Kernel::detect()
            ));
        }
        Ok(kernel)
    }

    /// The kernel products use: `SHRINK_KERNEL`'s if set and runnable, else the widest.
    pub fn current() -> Kernel {
        static CURRENT: OnceLock<Kernel> = OnceLock::new();
        *CURRENT.get_or_init(|| {
            Kernel::from_env()
                .ok()
                .flatten()
                .unwrap_or_else(Kernel::detect)
        })
    }
}

/// `C (m × n, row-major) = A (m × k) · B (k × n)`, or `C += A · B` when `accumulate`, on
/// [`Kernel::current`]. Runs on rayon's threads.
pub fn gemm(m: usize, n: usize, k: usize, a: Operand, b: Operand, c: &mut [f32], accumulate: bool) {
    gemm_with(Kernel::current(), m, n, k, a, b, c, accumulate, false);
}

/// `C (n × n) = Xᵀ X` for the rows of `x` (`rows × n`, row-major): each entry of the upper
/// triangle computed once (half a product's flops) and copied to the lower one, so the result is
/// exactly symmetric.
pub fn gram(x: &[f32], rows: usize, n: usize, c: &mut [f32]) {
    gram_with(Kernel::current(), x, rows, n, c);
}

/// [`gram`] on a given kernel.
pub fn gram_with(kernel: Kernel, x: &[f32], rows: usize, n: usize, c: &mut [f32]) {
    gemm_with(
        kernel,
        n,
        n,
        rows,
        Operand::transposed(x, n),
        Operand::row_major(x, n),
        c,
        false,
        true,
    );
    for i in 0..n {
        for j in 0..i {
            c[i * n + j] = c[j * n + i];
        }
    }
}

/// [`gemm`] on a given kernel; with `upper`, only the tiles holding entries `c[i][j]` with
/// `j >= i` are computed (the rest of `c` is left as it was).
#[allow(clippy::too_many_arguments)]
pub fn gemm_with(
    kernel: Kernel,
    m: usize,
    n: usize,
    k: usize,
    a: Operand,
    b: Operand,
    c: &mut [f32],
    accumulate: bool,
    upper: bool,
) {
    assert!(
        a.fits(m, k) && b.fits(k, n) && c.len() == m * n,
        "gemm: operands do not hold {m} × {k} and {k} × {n} matrices, or the output {m} × {n}"
    );
    if k == 0 {
        if !accumulate {
            c.fill(0.0);
        }
        return;
    }
    if m == 1 && !upper {
        // One row (a decoding step's attention): no tile would be more than a twelfth used, and
        // packing B would cost as much as the product. Each output's chain runs directly, B read
        // where it lies.
        c.par_chunks_mut(ROW_COLS)
            .with_min_len((1 << 14) / (k * ROW_COLS).max(1) + 1)
            .enumerate()
            .for_each(|(jb, out)| row_on(kernel, a, b, k, jb * ROW_COLS, out, accumulate));
        return;
    }
    // A is read where it lies (one broadcast per row and step), except its last MR rows when m is
    // not a multiple of MR: those are copied, zero-padded, to a panel of k × MR.
    let full_panels = m / MR;
    let mut edge = vec![0f32; if m.is_multiple_of(MR) { 0 } else { k * MR }];
    for r in 0..m % MR {
        for p in 0..k {
            edge[p * MR + r] = a.data[(full_panels * MR + r) * a.row_stride + p * a.col_stride];
        }
    }
    let out = SharedOut(c.as_mut_ptr());
    // Each task: one panel of NR columns of B (read where it lies when its rows are contiguous,
    // else packed to k × NR) against every panel of A, `k` in blocks of KC; a tile's sums go to
    // `c` between blocks and come back for the next (a stored and reloaded f32 is the same f32:
    // the chain goes on).
    (0..n.div_ceil(NR)).into_par_iter().for_each(|jp| {
        let j0 = jp * NR;
        let cols = NR.min(n - j0);
        let packed;
        let (b_panel, b_step): (&[f32], usize) = if b.col_stride == 1 && cols == NR {
            (&b.data[j0..], b.row_stride)
        } else {
            let mut panel = vec![0f32; k * NR];
            for (p, row) in panel.chunks_exact_mut(NR).enumerate() {
                for (l, v) in row.iter_mut().enumerate().take(cols) {
                    *v = b.data[p * b.row_stride + (j0 + l) * b.col_stride];
                }
            }
            packed = panel;
            (&packed, NR)
        };
        let mut p0 = 0;
        loop {
            let p1 = (p0 + KC).min(k);
            for q in 0..m.div_ceil(MR) {
                if upper && j0 + NR <= q * MR {
                    continue;
                }
                let rows = MR.min(m - q * MR);
                let mut acc = [[0f32; NR]; MR];
                if accumulate || p0 > 0 {
                    for (r, row) in acc.iter_mut().enumerate().take(rows) {
                        // SAFETY: row q·MR + r < m, columns j0..j0 + cols < n: inside `c`, and only
                        // this task touches these columns.
                        unsafe { out.read(((q * MR + r) * n + j0, cols), &mut row[..cols]) };
                    }
                }
                let a_tile = if q < full_panels {
                    Operand {
                        data: &a.data[q * MR * a.row_stride + p0 * a.col_stride..],
                        ..a
                    }
                } else {
                    Operand::transposed(&edge[p0 * MR..], MR)
                };
                let b_tile = Operand::row_major(&b_panel[p0 * b_step..], b_step);
                tile_on(kernel, a_tile, b_tile, p1 - p0, &mut acc);
                for (r, row) in acc.iter().enumerate().take(rows) {
                    // SAFETY: as above.
                    unsafe { out.write((q * MR + r) * n + j0, &row[..cols]) };
                }
            }
            if p1 >= k {
                break;
            }
            p0 = p1;
        }
    });
}

/// The output of [`gemm_with`], written by its tasks in disjoint column panels.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);

// SAFETY: the tasks sharing it write disjoint elements (see `gemm_with`).
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// # Safety
    /// `start..start + len` must lie inside the output, touched by no other thread meanwhile.
    unsafe fn read(&self, (start, len): (usize, usize), dst: &mut [f32]) {
        unsafe { std::ptr::copy_nonoverlapping(self.0.add(start), dst.as_mut_ptr(), len) }
    }

    /// # Safety
    /// As [`SharedOut::read`].
    unsafe fn write(&self, start: usize, src: &[f32]) {
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.0.add(start), src.len()) }
    }
}

/// One register tile: `acc[r][l] ← a(r, p) · b(p, l) + acc[r][l]` for p = 0 … k − 1 in order,
/// `a` an MR × k and `b` a k × NR operand.
fn tile_portable(a: Operand, b: Operand, k: usize, acc: &mut [[f32; NR]; MR]) {
    for p in 0..k {
        for (r, row) in acc.iter_mut().enumerate() {
            let x = a.data[r * a.row_stride + p * a.col_stride];
            for (l, c) in row.iter_mut().enumerate() {
                *c = x.mul_add(b.data[p * b.row_stride + l * b.col_stride], *c);
            }
        }
    }
}

/// [`tile_portable`] on AVX-512: the tile's MR × 32 sums in 2·MR registers. `b`'s rows must be contiguous (`col_stride` 1).
///
/// # Safety
/// The CPU must have AVX-512F and FMA; `a` must hold MR lanes and `b` NR lanes of `k` steps.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn tile_avx512(a: Operand, b: Operand, k: usize, acc: &mut [[f32; NR]; MR]) {
    use std::arch::x86_64::*;
    // SAFETY: every load is inside `a` or `b` (the caller's contract), every store inside `acc`.
    unsafe {
        let mut lo = [_mm512_setzero_ps(); MR];
        let mut hi = [_mm512_setzero_ps(); MR];
        for r in 0..MR {
            lo[r] = _mm512_loadu_ps(acc[r].as_ptr());
            hi[r] = _mm512_loadu_ps(acc[r].as_ptr().add(16));
        }
        let (pa, pb) = (a.data.as_ptr(), b.data.as_ptr());
        for p in 0..k {
            let b0 = _mm512_loadu_ps(pb.add(p * b.row_stride));
            let b1 = _mm512_loadu_ps(pb.add(p * b.row_stride + 16));
            let ap = pa.add(p * a.col_stride);
            for r in 0..MR {
                let x = _mm512_set1_ps(*ap.add(r * a.row_stride));
                lo[r] = _mm512_fmadd_ps(x, b0, lo[r]);
                hi[r] = _mm512_fmadd_ps(x, b1, hi[r]);
            }
        }
        for r in 0..MR {
            _mm512_storeu_ps(acc[r].as_mut_ptr(), lo[r]);
            _mm512_storeu_ps(acc[r].as_mut_ptr().add(16), hi[r]);
        }
    }
}

/// [`tile_portable`] on AVX2: the tile in quarters of 4 × 16 sums (8 of the 16 registers),
/// each a pass over `k`. `b`'s rows must be contiguous (`col_stride` 1).
///
/// # Safety
/// The CPU must have AVX2 and FMA; `a` must hold MR lanes and `b` NR lanes of `k` steps.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_avx2(a: Operand, b: Operand, k: usize, acc: &mut [[f32; NR]; MR]) {
    use std::arch::x86_64::*;
    // SAFETY: every load is inside `a` or `b` (the caller's contract), every store inside `acc`.
    unsafe {
        for r0 in (0..MR).step_by(4) {
            for l0 in (0..NR).step_by(16) {
                let mut lo = [_mm256_setzero_ps(); 4];
                let mut hi = [_mm256_setzero_ps(); 4];
                for r in 0..4 {
                    lo[r] = _mm256_loadu_ps(acc[r0 + r].as_ptr().add(l0));
                    hi[r] = _mm256_loadu_ps(acc[r0 + r].as_ptr().add(l0 + 8));
                }
                let (pa, pb) = (
                    a.data.as_ptr().add(r0 * a.row_stride),
                    b.data.as_ptr().add(l0),
                );
                for p in 0..k {
                    let b0 = _mm256_loadu_ps(pb.add(p * b.row_stride));
                    let b1 = _mm256_loadu_ps(pb.add(p * b.row_stride + 8));
                    let ap = pa.add(p * a.col_stride);
                    for r in 0..4 {
                        let x = _mm256_set1_ps(*ap.add(r * a.row_stride));
                        lo[r] = _mm256_fmadd_ps(x, b0, lo[r]);
                        hi[r] = _mm256_fmadd_ps(x, b1, hi[r]);
                    }
                }
                for r in 0..4 {
                    _mm256_storeu_ps(acc[r0 + r].as_mut_ptr().add(l0), lo[r]);
                    _mm256_storeu_ps(acc[r0 + r].as_mut_ptr().add(l0 + 8), hi[r]);
                }
            }
        }
    }
}

/// Columns of one row's output per task of the one-row product.
const ROW_COLS: usize = 64;

/// One row of a product: `out[l] ← Σ_p a(0, p) · b(p, j0 + l)` as the chain over p in order
/// (from `out[l]` when accumulating), for the `out.len()` columns from `j0`.
fn row_portable(a: Operand, b: Operand, k: usize, j0: usize, out: &mut [f32], accumulate: bool) {
    if !accumulate {
        out.fill(0.0);
    }
    for p in 0..k {
        let x = a.data[p * a.col_stride];
        for (l, c) in out.iter_mut().enumerate() {
            *c = x.mul_add(b.data[p * b.row_stride + (j0 + l) * b.col_stride], *c);
        }
    }
}

/// [`row_portable`] on AVX-512: the (up to) 64 columns in four vectors of 16, whose chains are
/// independent (one would wait on each fused multiply-add's latency), B loaded (unit column
/// stride) or gathered, lanes past the end masked.
///
/// # Safety
/// The CPU must have AVX-512F and FMA; `a` must hold `k` steps and `b` the columns
/// `j0 .. j0 + out.len()` of `k` rows, with `(j0 + out.len()) · col_stride` below 2³¹;
/// `out.len() <= ROW_COLS`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn row_avx512(
    a: Operand,
    b: Operand,
    k: usize,
    j0: usize,
    out: &mut [f32],
    accumulate: bool,
) {
    use std::arch::x86_64::*;
    const V: usize = ROW_COLS / 16;
    // SAFETY: every lane read or written is masked to the columns of `out`, inside `b` and `out`
    // (the caller's contract).
    unsafe {
        let lanes = _mm512_mullo_epi32(
            _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
            _mm512_set1_epi32(b.col_stride as i32),
        );
        let mask: [__mmask16; V] = std::array::from_fn(|v| {
            let n = out.len().saturating_sub(16 * v).min(16);
            ((1u32 << n) - 1) as u16
        });
        let dst = out.as_mut_ptr();
        let mut acc: [__m512; V] = std::array::from_fn(|v| match accumulate {
            true => _mm512_maskz_loadu_ps(mask[v], dst.add(16 * v)),
            false => _mm512_setzero_ps(),
        });
        let base = b.data.as_ptr().add(j0 * b.col_stride);
        for p in 0..k {
            let x = _mm512_set1_ps(*a.data.get_unchecked(p * a.col_stride));
            let row = base.add(p * b.row_stride);
            for v in 0..V {
                let src = row.add(16 * v * b.col_stride);
                let y = if b.col_stride == 1 {
                    _mm512_maskz_loadu_ps(mask[v], src)
                } else {
                    _mm512_mask_i32gather_ps::<4>(_mm512_setzero_ps(), mask[v], lanes, src)
                };
                acc[v] = _mm512_fmadd_ps(x, y, acc[v]);
            }
        }
        for v in 0..V {
            _mm512_mask_storeu_ps(dst.add(16 * v), mask[v], acc[v]);
        }
    }
}

fn row_on(
    kernel: Kernel,
    a: Operand,
    b: Operand,
    k: usize,
    j0: usize,
    out: &mut [f32],
    accumulate: bool,
) {
    assert!(
        a.fits(1, k)
            && b.fits(k, j0 + out.len())
            && (j0 + out.len()) * b.col_stride < 1 << 31
            && out.len() <= ROW_COLS,
        "gemm row out of its operands"
    );
    #[cfg(target_arch = "x86_64")]
    if kernel == Kernel::Avx512 && Kernel::detect() >= Kernel::Avx512 {
        // SAFETY: `Kernel::detect` found the features; the operands hold the row (asserted).
        return unsafe { row_avx512(a, b, k, j0, out, accumulate) };
    }
    let _ = kernel;
    row_portable(a, b, k, j0, out, accumulate)
}

fn tile_on(kernel: Kernel, a: Operand, b: Operand, k: usize, acc: &mut [[f32; NR]; MR]) {
    assert!(
        a.fits(MR, k) && b.fits(k, NR) && b.col_stride == 1,
        "gemm tile out of its operands"
    );
    #[cfg(target_arch = "x86_64")]
    match kernel {
        // SAFETY: `Kernel::detect` found these features (a forced kernel is never wider), and the
        // operands hold the tile (asserted above).
        Kernel::Avx512 if Kernel::detect() >= Kernel::Avx512 => {
            return unsafe { tile_avx512(a, b, k, acc) }
        }
        Kernel::Avx2 if Kernel::detect() >= Kernel::Avx2 => {
            return unsafe { tile_avx2(a, b, k, acc) }
        }
        _ => {}
    }
    let _ = kernel;
    tile_portable(a, b, k, acc)
}

#[cfg(test)]
mod tests;
