//! Fused CPU kernels for the two steps where candle's generic ops cost more than the matmuls around
//! them: the masked softmax of attention (candle would materialise a mask, add it, then run a
//! single-threaded softmax over the full square) and the SwiGLU product `silu(gate) * up`. Both run
//! in parallel over rows; the softmax only touches the visible (causal, in-window) positions.
//! The fused ops carry no gradient: when an input takes part in a gradient computation
//! (`track_op`), the same function is computed with candle's differentiable ops instead.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;
use shrink_core::gemm::{gemm, Operand};

fn contiguous_f32<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    op: &str,
) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("{op}: expected f32 input")
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("{op}: input must be contiguous")
    };
    Ok(&data[start..end])
}

/// Softmax over the last dimension of `scale * scores`, where query row `i` (of `t` rows) sits at
/// position `s - t + i` and sees keys `j` with `pos - window < j <= pos`; other entries are 0.
struct CausalSoftmax {
    scale: f32,
    window: usize,
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "causal-softmax"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let src = contiguous_f32(storage, layout, self.name())?;
        let dims = layout.shape().dims();
        let (t, s) = (dims[dims.len() - 2], dims[dims.len() - 1]);
        if t > s {
            candle_core::bail!("causal-softmax: {t} queries but only {s} keys");
        }
        let offset = s - t;
        let mut dst = vec![0f32; src.len()];
        dst.par_chunks_mut(s)
            .zip(src.par_chunks(s))
            .enumerate()
            .for_each(|(row, (out, x))| self.row(x, out, 0, offset + row % t));
        Ok((CpuStorage::F32(dst), layout.shape().clone()))
    }
}

impl CausalSoftmax {
    /// One query row at position `pos`: `out[j]` for the keys `j` of `x` (keys `first ..`), the
    /// visible ones from the scaled scores, the others 0.
    fn row(&self, x: &[f32], out: &mut [f32], first: usize, pos: usize) {
        let lo = (pos + 1).saturating_sub(self.window).max(first) - first;
        let hi = pos + 1 - first;
        out[..lo].fill(0.0);
        out[hi..].fill(0.0);
        let (x, out) = (&x[lo..hi], &mut out[lo..hi]);
        let max = max_of(x) * self.scale;
        let mut sum = 0f32;
        for (o, &v) in out.iter_mut().zip(x) {
            *o = (v * self.scale - max).exp();
            sum += *o;
        }
        let inv = 1.0 / sum;
        out.iter_mut().for_each(|o| *o *= inv);
    }
}

/// The largest of `x` (−∞ for none), in 16 lanes at once: a maximum is the same in any order.
fn max_of(x: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 16];
    let mut chunks = x.chunks_exact(16);
    for c in &mut chunks {
        for (m, &v) in lanes.iter_mut().zip(c) {
            *m = m.max(v);
        }
    }
    let tail = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    lanes.into_iter().fold(tail, f32::max)
}

/// Query rows per task of [`causal_attention`].
const QUERY_BLOCK: usize = 36;

/// Causal attention for inference, `softmax(scale · q·kᵀ + mask) · v` per head, for `q`
/// (`batch × heads × t × d`) and `k`, `v` (`batch × heads/groups × s × d`, grouped-query heads as
/// in [`per_head`]), query row `i` at position `s − t + i`. Each task takes a block of query rows
/// and only the keys they can see: the `t × s` scores are never held whole, and the keys after a
/// block's last row cost nothing. The values are those of [`per_head`] → [`causal_softmax`] →
/// [`per_head`] (the same chains: a product's terms for hidden keys are zeros). `None` when the
/// inputs are not [`fixed_order`]'s.
pub(crate) fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    groups: usize,
    scale: f64,
    window: Option<usize>,
) -> candle_core::Result<Option<Tensor>> {
    if !fixed_order(&[q, k, v]) {
        return Ok(None);
    }
    let (batch, heads, _, d) = q.dims4()?;
    let (kv_batch, kv_heads, s, _) = k.dims4()?;
    if kv_batch != batch || kv_heads * groups != heads || k.dims() != v.dims() || k.dim(3)? != d {
        candle_core::bail!(
            "causal attention: q {:?}, k {:?}, v {:?}",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    let (ks, vs) = (F32Values::of(k)?, F32Values::of(v)?);
    let (kv, vv): (&[f32], &[f32]) = (&ks, &vs);
    let heads_of = |j: usize| {
        let at = j * s * d..(j + 1) * s * d;
        (Keys::Rows(&kv[at.clone()]), &vv[at])
    };
    attend(q, groups, s, scale, window, heads_of).map(Some)
}

/// [`causal_attention`] of `q` over the positions in `held` and `k`, `v` after them, which are
/// added to `held` first. `None` when the inputs are not [`fixed_order`]'s and nothing is held
/// yet (the caller then keeps its cache as tensors).
pub(crate) fn causal_attention_cached(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    held: &mut HeldKv,
    groups: usize,
    scale: f64,
    window: Option<usize>,
) -> candle_core::Result<Option<Tensor>> {
    if !fixed_order(&[q, k, v]) {
        if held.len > 0 {
            candle_core::bail!(
                "cached attention: inputs that are not f32 on the CPU after f32 ones"
            );
        }
        return Ok(None);
    }
    let (batch, kv_heads, t, d) = k.dims4()?;
    if k.dims() != v.dims() || q.dims4()? != (batch, kv_heads * groups, t, d) {
        candle_core::bail!(
            "cached attention: q {:?}, k {:?}, v {:?}",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    held.append(
        &F32Values::of(k)?,
        &F32Values::of(v)?,
        batch * kv_heads,
        t,
        d,
    )?;
    let (cap, s) = (held.cap, held.len);
    let heads_of = |j: usize| {
        let keys = &held.keys[j * d * cap..(j + 1) * d * cap];
        (
            Keys::Columns(keys, cap),
            &held.values[j * cap * d..(j + 1) * cap * d],
        )
    };
    attend(q, groups, s, scale, window, heads_of).map(Some)
}

/// One key/value head's keys as [`attend`] reads them.
#[derive(Clone, Copy)]
enum Keys<'a> {
    /// `s × d`, a key per row.
    Rows(&'a [f32]),
    /// `d × cap`, a key per column (a cache's layout: a step's keys are read along rows).
    Columns(&'a [f32], usize),
}

impl<'a> Keys<'a> {
    /// Keys `first .. end` as the `d × (end − first)` right operand of `q · kᵀ`.
    fn operand(self, d: usize, first: usize, end: usize) -> Operand<'a> {
        match self {
            Keys::Rows(k) => Operand::transposed(&k[first * d..end * d], d),
            Keys::Columns(k, cap) => Operand {
                data: &k[first..(d - 1) * cap + end],
                row_stride: cap,
                col_stride: 1,
            },
        }
    }
}

/// The attention of `q` over `s` positions, key/value head `j`'s keys and values (rows of `d`)
/// given by `heads_of(j)`.
fn attend<'a>(
    q: &Tensor,
    groups: usize,
    s: usize,
    scale: f64,
    window: Option<usize>,
    heads_of: impl Fn(usize) -> (Keys<'a>, &'a [f32]) + Sync,
) -> candle_core::Result<Tensor> {
    let (batch, heads, t, d) = q.dims4()?;
    if t > s || groups == 0 || heads % groups != 0 {
        candle_core::bail!(
            "causal attention: {t} queries over {s} keys, {heads} heads in groups of {groups}"
        );
    }
    let kv_heads = heads / groups;
    let softmax = CausalSoftmax {
        scale: scale as f32,
        window: window.unwrap_or(usize::MAX),
    };
    let qs = F32Values::of(q)?;
    let qv: &[f32] = &qs;
    let mut out = vec![0f32; batch * heads * t * d];
    out.par_chunks_mut((t * d).max(1))
        .enumerate()
        .for_each(|(i, head_out)| {
            let q = &qv[i * t * d..(i + 1) * t * d];
            let (keys, v) = heads_of((i / heads) * kv_heads + (i % heads) / groups);
            head_out
                .par_chunks_mut(QUERY_BLOCK * d)
                .enumerate()
                .for_each(|(blk, o)| {
                    let (r0, rows) = (blk * QUERY_BLOCK, o.len() / d);
                    let (first_pos, last_pos) = (s - t + r0, s - t + r0 + rows - 1);
                    let first = (first_pos + 1).saturating_sub(softmax.window);
                    let n = last_pos + 1 - first;
                    let mut scores = vec![0f32; rows * n];
                    let q = Operand::row_major(&q[r0 * d..(r0 + rows) * d], d);
                    gemm(
                        rows,
                        n,
                        d,
                        q,
                        keys.operand(d, first, last_pos + 1),
                        &mut scores,
                        false,
                    );
                    let mut probs = vec![0f32; rows * n];
                    for (r, (x, p)) in scores.chunks(n).zip(probs.chunks_mut(n)).enumerate() {
                        softmax.row(x, p, first, first_pos + r);
                    }
                    let values = Operand::row_major(&v[first * d..(last_pos + 1) * d], d);
                    gemm(rows, d, n, Operand::row_major(&probs, n), values, o, false);
                });
        });
    Tensor::from_vec(out, (batch, heads, t, d), q.device())
}

/// A decoder block's cached keys and values as [`causal_attention_cached`] reads them: per
/// key/value head (batch × heads), keys as the columns of a `d × cap` matrix and values as the
/// rows of a `cap × d` one, room for `cap` positions (doubled when full), `len` of them filled.
/// A step adds its positions in place: nothing already held is copied again.
#[derive(Clone, Debug, Default)]
pub struct HeldKv {
    keys: Vec<f32>,
    values: Vec<f32>,
    heads: usize,
    d: usize,
    len: usize,
    cap: usize,
}

impl HeldKv {
    /// Number of positions held.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Adds `t` positions of `heads` heads: `k`, `v` are `heads × t × d`, row-major.
    fn append(
        &mut self,
        k: &[f32],
        v: &[f32],
        heads: usize,
        t: usize,
        d: usize,
    ) -> candle_core::Result<()> {
        if self.len > 0 && (heads, d) != (self.heads, self.d) {
            candle_core::bail!(
                "cached attention: {heads} heads of {d} after {} of {}",
                self.heads,
                self.d
            );
        }
        (self.heads, self.d) = (heads, d);
        if self.len + t > self.cap {
            let cap = (2 * self.cap).max(self.len + t).max(64);
            let (mut keys, mut values) = (vec![0f32; heads * d * cap], vec![0f32; heads * cap * d]);
            for h in 0..heads {
                for c in 0..d {
                    let (from, to) = ((h * d + c) * self.cap, (h * d + c) * cap);
                    keys[to..to + self.len].copy_from_slice(&self.keys[from..from + self.len]);
                }
                let (from, to) = (h * self.cap * d, h * cap * d);
                values[to..to + self.len * d]
                    .copy_from_slice(&self.values[from..from + self.len * d]);
            }
            (self.keys, self.values, self.cap) = (keys, values, cap);
        }
        let cap = self.cap;
        for h in 0..heads {
            for r in 0..t {
                let row = (h * t + r) * d;
                for (c, &x) in k[row..row + d].iter().enumerate() {
                    self.keys[(h * d + c) * cap + self.len + r] = x;
                }
                let at = (h * cap + self.len + r) * d;
                self.values[at..at + d].copy_from_slice(&v[row..row + d]);
            }
        }
        self.len += t;
        Ok(())
    }
}

/// `softmax(scale * scores + causal/window mask)` over the last dimension, computed in f32.
pub(crate) fn causal_softmax(
    scores: &Tensor,
    scale: f64,
    window: Option<usize>,
) -> candle_core::Result<Tensor> {
    let dtype = scores.dtype();
    if scores.track_op() {
        return differentiable_causal_softmax(scores, scale, window);
    }
    let op = CausalSoftmax {
        scale: scale as f32,
        window: window.unwrap_or(usize::MAX),
    };
    scores
        .to_dtype(DType::F32)?
        .contiguous()?
        .apply_op1_no_bwd(&op)?
        .to_dtype(dtype)
}

/// The same softmax from candle's differentiable ops: an additive mask, then softmax.
fn differentiable_causal_softmax(
    scores: &Tensor,
    scale: f64,
    window: Option<usize>,
) -> candle_core::Result<Tensor> {
    let dims = scores.dims();
    let (t, s) = (dims[dims.len() - 2], dims[dims.len() - 1]);
    let window = window.unwrap_or(usize::MAX);
    let mask: Vec<f32> = (0..t * s)
        .map(|idx| {
            let (i, j) = (idx / s, idx % s);
            let pos = s - t + i;
            if j <= pos && pos - j < window {
                0.0
            } else {
                f32::NEG_INFINITY
            }
        })
        .collect();
    let mask = Tensor::from_vec(mask, (t, s), scores.device())?;
    let x = (scores.to_dtype(DType::F32)? * scale)?.broadcast_add(&mask)?;
    candle_nn::ops::softmax(&x, candle_core::D::Minus1)?.to_dtype(scores.dtype())
}

struct SiluMul;

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "silu-mul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        if l1.shape() != l2.shape() {
            candle_core::bail!(
                "silu-mul: shapes {:?} and {:?} differ",
                l1.shape(),
                l2.shape()
            );
        }
        let (a, b) = (
            contiguous_f32(s1, l1, self.name())?,
            contiguous_f32(s2, l2, self.name())?,
        );
        let mut dst = vec![0f32; a.len()];
        const CHUNK: usize = 4096;
        dst.par_chunks_mut(CHUNK)
            .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
            .for_each(|(o, (a, b))| {
                for ((o, &a), &b) in o.iter_mut().zip(a).zip(b) {
                    *o = a / (1.0 + (-a).exp()) * b;
                }
            });
        Ok((CpuStorage::F32(dst), l1.shape().clone()))
    }
}

/// `silu(gate) * up`, fused for f32; other dtypes use candle's ops.
pub(crate) fn silu_mul(gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
    if gate.dtype() == DType::F32 && up.dtype() == DType::F32 && !gate.track_op() && !up.track_op()
    {
        gate.contiguous()?
            .apply_op2_no_bwd(&up.contiguous()?, &SiluMul)
    } else {
        gate.silu()? * up
    }
}

/// A tensor's values in f32, row-major: borrowed from its storage when it is contiguous f32 on
/// the CPU (no copy), converted otherwise.
pub enum F32Values<'a> {
    /// The storage's read guard (candle's lock type) and the tensor's range in it.
    Stored(
        Box<dyn std::ops::Deref<Target = candle_core::Storage> + 'a>,
        std::ops::Range<usize>,
    ),
    Converted(Vec<f32>),
}

impl<'a> F32Values<'a> {
    pub fn of(t: &'a Tensor) -> candle_core::Result<Self> {
        use candle_core::{CpuStorage, Storage};
        if t.dtype() == candle_core::DType::F32 {
            let (storage, layout) = t.storage_and_layout();
            let cpu = matches!(&*storage, Storage::Cpu(CpuStorage::F32(_)));
            if let (Some((start, end)), true) = (layout.contiguous_offsets(), cpu) {
                return Ok(F32Values::Stored(Box::new(storage), start..end));
            }
        }
        Ok(F32Values::Converted(
            t.to_dtype(candle_core::DType::F32)?
                .flatten_all()?
                .to_vec1()?,
        ))
    }
}

impl std::ops::Deref for F32Values<'_> {
    type Target = [f32];

    fn deref(&self) -> &[f32] {
        use candle_core::{CpuStorage, Storage};
        match self {
            F32Values::Stored(storage, range) => match &***storage {
                Storage::Cpu(CpuStorage::F32(v)) => &v[range.clone()],
                // `of` stores only CPU f32 storage.
                _ => &[],
            },
            F32Values::Converted(v) => v,
        }
    }
}

/// Whether a product of these tensors runs on [`shrink_core::gemm`] (the same bits on every CPU):
/// f32 on the CPU, outside any gradient computation. Other products use candle's.
fn fixed_order(ts: &[&Tensor]) -> bool {
    ts.iter()
        .all(|t| t.dtype() == DType::F32 && t.device().is_cpu() && !t.track_op())
}

/// `x · wᵀ` for rows `x` (`rows × in`) and a linear layer's weight `w` (`out × in`).
pub(crate) fn linear(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    if !fixed_order(&[x, w]) {
        return x.matmul(&w.t()?);
    }
    let (rows, k) = x.dims2()?;
    let n = w.dim(0)?;
    let (xs, ws) = (F32Values::of(x)?, F32Values::of(w)?);
    let mut y = vec![0f32; rows * n];
    gemm(
        rows,
        n,
        k,
        Operand::row_major(&xs, k),
        Operand::transposed(&ws, k),
        &mut y,
        false,
    );
    Tensor::from_vec(y, (rows, n), x.device())
}

/// `x · wᵀ` with `w` in ggml blocks: the activations rounded to llama.cpp's 8-bit blocks and
/// multiplied by integer dot products ([`shrink_core::qmatmul`]). `None` when `x` takes part in a
/// gradient computation (the caller then uses the float weight).
pub(crate) fn packed_linear(
    x: &Tensor,
    w: &shrink_core::qmatmul::QMatrix,
) -> candle_core::Result<Option<Tensor>> {
    if x.track_op() || !x.device().is_cpu() {
        return Ok(None);
    }
    let (rows, k) = x.dims2()?;
    if k != w.cols() {
        candle_core::bail!("packed linear: {k} inputs for {} columns", w.cols());
    }
    let xs = F32Values::of(x)?;
    let y = w.matmul(&xs, rows);
    Tensor::from_vec(y, (rows, w.rows()), x.device())?
        .to_dtype(x.dtype())
        .map(Some)
}

/// Per head, `a · b` (`b_transposed`: `a · bᵀ`) for `a` (`batch × heads × m × k`) and `b` with
/// `heads / groups` heads (grouped-query attention: head `h` reads `b`'s head `h / groups`);
/// `None` when the product is not [`fixed_order`]'s (the caller then uses candle's).
pub(crate) fn per_head(
    a: &Tensor,
    b: &Tensor,
    groups: usize,
    b_transposed: bool,
) -> candle_core::Result<Option<Tensor>> {
    if !fixed_order(&[a, b]) {
        return Ok(None);
    }
    let (batch, heads, m, k) = a.dims4()?;
    let (_, kv_heads, r, c) = b.dims4()?;
    let n = if b_transposed { r } else { c };
    if kv_heads * groups != heads || (if b_transposed { c } else { r }) != k {
        candle_core::bail!("per-head product: {:?} by {:?}", a.dims(), b.dims());
    }
    let (a_values, b_values) = (F32Values::of(a)?, F32Values::of(b)?);
    let (av, bv): (&[f32], &[f32]) = (&a_values, &b_values);
    let mut out = vec![0f32; batch * heads * m * n];
    out.par_chunks_mut((m * n).max(1))
        .enumerate()
        .for_each(|(i, o)| {
            let a = &av[i * m * k..(i + 1) * m * k];
            let j = (i / heads) * kv_heads + (i % heads) / groups;
            let b = &bv[j * r * c..(j + 1) * r * c];
            let b = if b_transposed {
                Operand::transposed(b, k)
            } else {
                Operand::row_major(b, n)
            };
            gemm(m, n, k, Operand::row_major(a, k), b, o, false);
        });
    Tensor::from_vec(out, (batch, heads, m, n), a.device()).map(Some)
}

#[cfg(test)]
mod tests;
