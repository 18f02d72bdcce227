//! Quantization-aware training: every block linear computes with a fake-quantized weight, and
//! the student is distilled from the unquantized model with [`shrink_train`]'s trainer.
//!
//! - Grid schemes (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and any bits × group, channel or tensor scheme):
//!   the codes are `clamp(round(w / s))` with a straight-through gradient for the rounding (zero
//!   outside the clip range, identity inside) and LSQ: the per-group scale `s` (and, on the
//!   asymmetric grid, the minimum) is a trained parameter. Scales are rounded to fp16 in the
//!   forward pass, as they are stored, so the exported codes and scales reproduce the trained
//!   model exactly.
//! - K-quants (Q2_K … Q6_K) train on the saved grid: each weight's value is `d·sc·(q − offset) −
//!   dmin·mn` exactly as llama.cpp decodes the block, with the super-block's `d` and `dmin`
//!   (rounded to fp16 as stored) and each group's integer scale `sc` and minimum `mn` (rounded,
//!   clipped to their bit widths) all learned: LSQ twice over, the group scales quantized by the
//!   super-block scale as the weights are by the group scales, each rounding straight-through.
//!   What is trained is the block that is written, bit for bit.
//! - IQ4_XS trains on its saved grid the same way: `d·ls·v` with `d` and each sub-block's signed
//!   6-bit `ls` learned, each weight the nearest of IQ4_NL's 16 levels `v` (LSQ's gradient with
//!   the nearest level in place of the rounded code); IQ4_NL likewise under its blocks' fp16 `d`.
//! - The other i-quants (IQ3_XXS, IQ3_S, IQ2_XXS, IQ2_XS, IQ2_S): the weight is quantized and
//!   dequantized by the i-quant quantizer at every step (their scales are refitted, not
//!   learned) with a straight-through gradient.
//!
//! The result is a [`QuantizedModel`], written through the same GGUF / compressed-tensors path
//! as post-training quantization.

use crate::grid::{Grid, GroupParams};
use crate::kquant::{GgmlTensor, KScales, QK_K};
use crate::tensor::{Granularity, QuantScheme, QuantizedTensor};
use crate::{LayerReport, QuantError, QuantizedModel, QuantizedWeight, Result};
use candle_core::{DType, Tensor, Var};
use half::f16;
use saved::Saved;
use shrink_core::iquant::tables::KVALUES_IQ4NL;
use shrink_core::iquant::IQuant;
use shrink_core::Progress;
use shrink_io::ggml::GgmlType;
use shrink_models::Transformer;
use shrink_train::{trainable, DistillConfig, Distiller, Teacher, TrainConfig, TrainOutcome};
use std::path::Path;

/// What QAT trains and how.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct QatJob {
    pub train: TrainConfig,
    pub loss: DistillConfig,
    /// Student tensors kept frozen (the token embedding by default: it is quantized at export by
    /// round-to-nearest, like llama-quantize does).
    pub frozen: Vec<String>,
    /// Fake-quantize the linears' input activations too (W8A8), as this says for each linear.
    pub activations: Option<crate::Activations>,
    /// Learn the scales (LSQ): the grid schemes' group scales and minima, the k-quants' and
    /// IQ4_XS's super-block and group scales and minima, IQ4_NL's block scales; off keeps the
    /// initial scales fixed (the weights still train on the saved grid). The other i-quants'
    /// scales are refitted either way.
    pub learn_scales: bool,
}

impl Default for QatJob {
    fn default() -> Self {
        Self {
            train: TrainConfig::default(),
            loss: DistillConfig::default(),
            // The token embedding, under each family's name.
            frozen: ["embed_tokens", "word_embeddings", "wte"]
                .map(String::from)
                .to_vec(),
            activations: None,
            learn_scales: true,
        }
    }
}

/// How one linear is fake-quantized.
#[derive(Debug, Clone)]
enum Quantizer {
    Grid {
        scheme: QuantScheme,
        /// `(groups, 1)`: one scale per group, groups in row-major order.
        scale: Var,
        /// The asymmetric grid's minimums, `(groups, 1)`.
        min: Option<Var>,
    },
    /// A k-quant or IQ4_XS on its saved grid (see [`KGrid`]).
    K(KGrid),
    /// IQ4_NL on its saved grid: `(blocks, 1)` scales `128·d` (`d` stored in fp16), each
    /// weight the nearest of the 16 levels over 128 times it.
    Levels(Var),
    /// An i-quant, quantized and dequantized at every step.
    Refit(GgmlType),
}

/// A k-quant (or IQ4_XS) linear's learned block scales. The super-block variables hold
/// `held·d / unit` (`unit` a power of two near the largest integer scale; `held` 1, or 128 in
/// IQ4_XS, whose codes are held as the levels over 128), so they are of the size of a group
/// scale and the optimizer's steps move them by as much, relatively, as the group scales.
#[derive(Debug, Clone)]
struct KGrid {
    kind: Saved,
    /// `(blocks, 1)`: `held·d / unit`.
    sup: Var,
    /// `(blocks, groups per block)`: each group's scale `held·d·sc` before its rounding.
    scale: Var,
    /// The minima's `dmin / unit` and `dmin·mn`, for Q2_K, Q4_K and Q5_K.
    min: Option<(Var, Var)>,
}

#[derive(Debug, Clone)]
struct QatLinear {
    name: String,
    latent: Var,
    rows: usize,
    cols: usize,
    quantizer: Quantizer,
}

/// IQ4_NL's level nearest `x` over 128 (ties to the upper one, as ggml): its index and its value.
/// Held over 128, the levels span about ±1 as the k-quants' codes span a few units, so the
/// scales QAT learns are of the weights' size and Adam's steps move them as much.
fn nearest_level(x: f32) -> (u8, f32) {
    let i = crate::iquant::best_index(&KVALUES_IQ4NL, x * LEVELS_HELD);
    (i, KVALUES_IQ4NL[i as usize] as f32 / LEVELS_HELD)
}

/// What QAT divides IQ4_NL's levels by, and so multiplies the IQ4 scales by.
const LEVELS_HELD: f32 = 128.0;

/// The span of [`nearest_level`]'s levels.
const LEVELS_SPAN: (f32, f32) = (
    KVALUES_IQ4NL[0] as f32 / LEVELS_HELD,
    KVALUES_IQ4NL[15] as f32 / LEVELS_HELD,
);

/// `round(x)` with an identity gradient.
pub fn round_ste(x: &Tensor) -> candle_core::Result<Tensor> {
    x + (x.round()? - x)?.detach()
}

/// The code range of a grid, as signed values relative to its offset.
fn code_range(scheme: &QuantScheme) -> (f64, f64) {
    let half = (1u32 << (scheme.bits - 1)) as f64;
    match scheme.grid {
        Grid::Symmetric => (-(half - 1.0), half - 1.0),
        Grid::SymmetricFull => (-half, half - 1.0),
        Grid::Asymmetric => (0.0, ((1u32 << scheme.bits) - 1) as f64),
    }
}

fn group_len(scheme: &QuantScheme, rows: usize, cols: usize) -> usize {
    match scheme.granularity {
        Granularity::Tensor => rows * cols,
        Granularity::Channel => cols,
        Granularity::Group(g) => g,
    }
}

/// The fused fake quantizer: one pass forward, one pass backward, and no intermediate tensors
/// kept for the backward pass (a composed version held a dozen weight-sized copies per linear:
/// 21 GB of peak memory for SmolLM2's QAT).
#[derive(Debug, Clone, Copy)]
struct FakeQuantOp {
    lo: f32,
    hi: f32,
    group: usize,
    asymmetric: bool,
    params: Params,
    /// The codes are IQ4_NL's 16 levels over 128 ([`nearest_level`], spanning `lo..=hi`),
    /// not the integers `lo..=hi`.
    levels: bool,
}

/// How [`FakeQuantOp`] reads a group's scale and minimum.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Params {
    /// Rounded to fp16 as a grid scheme stores them, a zero scale (an all-zero group) read as 1.
    Stored,
    /// As given (a k-quant group's `d·sc` and `−dmin·mn`).
    Exact,
    /// A scale held as `held·d`, `d` stored in fp16 (IQ4_NL's, `held` 128): the scale is
    /// `held·fp16(s / held)`, what the stored `d` decodes to, subnormal or not; a zero scale
    /// leaves zeros; no minimum.
    Half { held: f32 },
    /// A super-block scale `d` held as `held·d / unit` (k-quants: `held` 1; IQ4_XS: 128): the
    /// scale is `held·fp16(s·unit / held)` (the gradient passes straight through the fp16
    /// rounding, times `unit`). Used without a minimum (the group minima are rounded as scales
    /// of their own).
    Super { unit: f32, held: f32 },
}

impl FakeQuantOp {
    /// The scale and minimum the group computes with, or `None` for a zero scale outside the
    /// grid schemes (every value is then the minimum).
    fn params(&self, s: f32, m: f32) -> Option<(f32, f32)> {
        match self.params {
            Params::Stored => {
                let s = f16::from_f32(s).to_f32();
                Some((if s == 0.0 { 1.0 } else { s }, f16::from_f32(m).to_f32()))
            }
            Params::Exact => (s != 0.0).then_some((s, m)),
            Params::Half { held } => {
                let s = held * self.stored(s).to_f32();
                (s != 0.0).then_some((s, 0.0))
            }
            Params::Super { held, .. } => {
                let s = held * self.stored(s).to_f32();
                (s != 0.0).then_some((s, held * self.stored(m).to_f32()))
            }
        }
    }

    /// The fp16 a held scale is stored as ([`Params::Half`], [`Params::Super`]).
    fn stored(&self, s: f32) -> f16 {
        match self.params {
            Params::Half { held } => f16::from_f32(s / held),
            Params::Super { unit, held } => f16::from_f32(s * unit / held),
            Params::Stored | Params::Exact => f16::from_f32(s),
        }
    }

    /// The gradient of the variable holding a scale, per unit gradient of the scale.
    fn scale_unit(&self) -> f32 {
        match self.params {
            Params::Super { unit, .. } => unit,
            _ => 1.0,
        }
    }

    /// The code of `w` in a group of scale `s` and minimum `m` (signed, relative to the grid's
    /// offset).
    fn code(&self, w: f32, s: f32, m: f32) -> f32 {
        self.snap(self.position(w, s, m))
    }

    /// The code nearest the position `x`: the rounded integer in the range, or the nearest level.
    fn snap(&self, x: f32) -> f32 {
        if self.levels {
            nearest_level(x).1
        } else {
            x.clamp(self.lo, self.hi).round()
        }
    }

    /// The value of `code`.
    fn value(&self, code: f32, s: f32, m: f32) -> f32 {
        if self.asymmetric {
            code * s + m
        } else {
            code * s
        }
    }

    /// The unclipped code position of `w`.
    fn position(&self, w: f32, s: f32, m: f32) -> f32 {
        if self.asymmetric {
            (w - m) / s
        } else {
            w / s
        }
    }
}

fn f32_slice<'a>(
    storage: &'a candle_core::CpuStorage,
    layout: &candle_core::Layout,
) -> candle_core::Result<&'a [f32]> {
    let candle_core::CpuStorage::F32(data) = storage else {
        candle_core::bail!("fake quantization: expected f32")
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("fake quantization: expected a contiguous tensor")
    };
    Ok(&data[start..end])
}

fn vec_of(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.flatten_all()?.to_vec1::<f32>()
}

impl candle_core::CustomOp3 for FakeQuantOp {
    fn name(&self) -> &'static str {
        "fake-quantize"
    }

    fn cpu_fwd(
        &self,
        s1: &candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
        s3: &candle_core::CpuStorage,
        l3: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use rayon::prelude::*;
        let (w, scale, min) = (f32_slice(s1, l1)?, f32_slice(s2, l2)?, f32_slice(s3, l3)?);
        let mut out = vec![0f32; w.len()];
        out.par_chunks_mut(self.group)
            .zip(w.par_chunks(self.group))
            .enumerate()
            .for_each(|(g, (o, w))| match self.params(scale[g], min[g]) {
                Some((s, m)) => {
                    for (o, &w) in o.iter_mut().zip(w) {
                        *o = self.value(self.code(w, s, m), s, m);
                    }
                }
                None => o.fill(if self.asymmetric { min[g] } else { 0.0 }),
            });
        Ok((candle_core::CpuStorage::F32(out), l1.shape().clone()))
    }

    /// Straight-through for the rounding, zero outside the clip range; LSQ for the scale
    /// (`snap(x) − x` inside: the rounded code, or the nearest level, less `x`; the bound
    /// outside) and the minimum (0 inside, 1 outside). A group of zero scale outside the grid
    /// schemes is LSQ's limit as the scale goes to zero: every value at the bound on its side of
    /// the minimum, so the scale can grow again. A group scale rounded under a super-block scale
    /// ([`Params::Super`]) that has left its range still gets the gradient that moves it back in
    /// (otherwise a scale below zero would be stuck there).
    fn bwd(
        &self,
        w: &Tensor,
        scale: &Tensor,
        min: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        use rayon::prelude::*;
        let (wv, sv, mv, gv) = (vec_of(w)?, vec_of(scale)?, vec_of(min)?, vec_of(grad)?);
        let groups = sv.len();
        let mut gw = vec![0f32; wv.len()];
        let per_group: Vec<(f32, f32)> = gw
            .par_chunks_mut(self.group)
            .zip(wv.par_chunks(self.group).zip(gv.par_chunks(self.group)))
            .enumerate()
            .map(|(g, (gw, (w, grad)))| {
                let Some((s, m)) = self.params(sv[g], mv[g]) else {
                    let m = if self.asymmetric { mv[g] } else { 0.0 };
                    let bound = |w: f32| match w.partial_cmp(&m) {
                        Some(std::cmp::Ordering::Greater) => self.hi,
                        Some(std::cmp::Ordering::Less) => self.lo,
                        _ => 0.0,
                    };
                    let gs: f32 = w.iter().zip(grad).map(|(&w, &d)| d * bound(w)).sum();
                    return (gs * self.scale_unit(), grad.iter().sum());
                };
                let back_in = matches!(self.params, Params::Super { .. });
                let (mut gs, mut gm) = (0f32, 0f32);
                for ((gw, &w), &d) in gw.iter_mut().zip(w).zip(grad) {
                    let x = self.position(w, s, m);
                    if x < self.lo || x > self.hi {
                        gs += d * if x < self.lo { self.lo } else { self.hi };
                        gm += d;
                        // A descent step moves w against d·s: back towards the range?
                        if back_in && ((x < self.lo) == (d * s < 0.0)) {
                            *gw = d;
                        }
                    } else {
                        *gw = d;
                        gs += d * (self.snap(x) - x);
                    }
                }
                (gs * self.scale_unit(), gm)
            })
            .collect();
        let device = w.device();
        let column = |v: Vec<f32>| Tensor::from_vec(v, (groups, 1), device);
        let gs = column(per_group.iter().map(|p| p.0).collect())?;
        let gm = self
            .asymmetric
            .then(|| column(per_group.iter().map(|p| p.1).collect()))
            .transpose()?;
        Ok((Some(Tensor::from_vec(gw, w.shape(), device)?), Some(gs), gm))
    }
}

/// The fake-quantized weight `rows × cols` of a grid scheme: codes `round(clip(x))` of
/// `x = w / s` (or `(w − m) / s` on the asymmetric grid) times the fp16-rounded scale (plus the
/// minimum). Gradients: identity for `w` inside the clip range and zero outside
/// (straight-through), LSQ's for `s` and `m`.
pub fn fake_quantize(
    w: &Tensor,
    scale: &Tensor,
    min: Option<&Tensor>,
    scheme: &QuantScheme,
) -> candle_core::Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    let (lo, hi) = code_range(scheme);
    let op = FakeQuantOp {
        lo: lo as f32,
        hi: hi as f32,
        group: group_len(scheme, rows, cols),
        asymmetric: min.is_some(),
        params: Params::Stored,
        levels: false,
    };
    apply(op, w, scale, min)
}

/// `op` on `w` (any shape, its groups consecutive in row-major order) with one scale (and
/// minimum) per group.
fn apply(
    op: FakeQuantOp,
    w: &Tensor,
    scale: &Tensor,
    min: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    let groups = w.elem_count() / op.group;
    let scale = scale.reshape((groups, 1))?.contiguous()?;
    let min = match min {
        Some(m) => m.reshape((groups, 1))?.contiguous()?,
        None => scale.zeros_like()?,
    };
    w.to_dtype(DType::F32)?
        .contiguous()?
        .apply_op3(&scale, &min, op)
}

impl KGrid {
    /// The variables, initialized to the blocks' stored scales.
    fn new(kind: Saved, bytes: &[u8], device: &candle_core::Device) -> Result<Self> {
        let (unit, held) = (Self::unit(kind), kind.held());
        let blocks: Vec<KScales> = bytes
            .chunks(kind.block_bytes())
            .map(|b| kind.scales(b))
            .collect();
        let n = blocks.len();
        let var = |v: Vec<f32>, cols: usize| -> Result<Var> {
            Ok(Var::from_tensor(&Tensor::from_vec(v, (n, cols), device)?)?)
        };
        let per = kind.groups();
        let sup =
            |d: fn(&KScales) -> f16| blocks.iter().map(|s| held * d(s).to_f32() / unit).collect();
        let groups = |d: fn(&KScales) -> f16, v: fn(&KScales) -> &[i32]| {
            blocks
                .iter()
                .flat_map(|s| v(s).iter().map(move |&x| held * d(s).to_f32() * x as f32))
                .collect()
        };
        Ok(Self {
            kind,
            sup: var(sup(|s| s.d), 1)?,
            scale: var(groups(|s| s.d, |s| &s.sc), per)?,
            min: match kind.min_max() {
                Some(_) => Some((
                    var(sup(|s| s.dmin), 1)?,
                    var(groups(|s| s.dmin, |s| &s.mn), per)?,
                )),
                None => None,
            },
        })
    }

    /// The power of two the super-block variables are held in units of: one over the number
    /// of integer scales on the wider side of zero (16, 32, 64, 128).
    fn unit(kind: Saved) -> f32 {
        let (lo, hi) = kind.scale_range();
        1.0 / lo.unsigned_abs().max(hi as u32 + 1).next_power_of_two() as f32
    }

    /// The ops that round the group scales and the group minima (to their integers) under
    /// their super-block's scales.
    fn scale_ops(&self) -> (FakeQuantOp, FakeQuantOp) {
        let op = |lo: i32, hi: i32| FakeQuantOp {
            lo: lo as f32,
            hi: hi as f32,
            group: self.kind.groups(),
            asymmetric: false,
            params: Params::Super {
                unit: Self::unit(self.kind),
                held: self.kind.held(),
            },
            levels: false,
        };
        let (lo, hi) = self.kind.scale_range();
        (op(lo, hi), op(0, self.kind.min_max().unwrap_or(0)))
    }

    /// The op that rounds the weights under their groups' scales and minima.
    fn weight_op(&self) -> FakeQuantOp {
        let (lo, hi, levels) = self.kind.codes();
        FakeQuantOp {
            lo,
            hi,
            group: self.kind.group(),
            asymmetric: self.min.is_some(),
            params: Params::Exact,
            levels,
        }
    }

    /// Each group's scale `d·sc` and (negated) minimum `−dmin·mn`, `(groups, 1)`, as stored.
    fn group_params(&self) -> candle_core::Result<(Tensor, Option<Tensor>)> {
        let (scale_op, min_op) = self.scale_ops();
        let scale = apply(scale_op, self.scale.as_tensor(), self.sup.as_tensor(), None)?;
        let min = match &self.min {
            Some((sup, min)) => Some(apply(min_op, min.as_tensor(), sup.as_tensor(), None)?.neg()?),
            None => None,
        };
        Ok((scale, min))
    }

    /// The fake-quantized weight.
    fn weight(&self, w: &Tensor) -> candle_core::Result<Tensor> {
        let (scale, min) = self.group_params()?;
        apply(self.weight_op(), w, &scale, min.as_ref())
    }

    /// The blocks of the current weight `w`: the scales and codes the forward pass used. A
    /// weight or scale that is not finite (a diverged run) is an error naming the linear.
    fn export(&self, name: &str, w: &[f32], rows: usize, cols: usize) -> Result<GgmlTensor> {
        let kind = self.kind;
        let vec = |t: &Tensor| -> Result<Vec<f32>> { Ok(t.flatten_all()?.to_vec1()?) };
        let mut vars = vec![&self.sup, &self.scale];
        if let Some((sup, min)) = &self.min {
            vars.extend([sup, min]);
        }
        for v in vars {
            shrink_core::check_matrix(&vec(v.as_tensor())?, 1, v.elem_count(), name)?;
        }
        shrink_core::check_matrix(w, rows, cols, name)?;
        let (scale, min) = self.group_params()?;
        let (a, m) = (vec(&scale)?, min.as_ref().map(vec).transpose()?);
        let per = kind.groups();
        let (scale_op, min_op) = self.scale_ops();
        // The integer scales and minima, by the rounding `group_params` did.
        let ints = |op: FakeQuantOp, sup: &Var, v: &Var| -> Result<(Vec<f16>, Vec<i32>)> {
            let (sup, v) = (vec(sup.as_tensor())?, vec(v.as_tensor())?);
            let d: Vec<f16> = sup
                .iter()
                // As the forward pass reads it; a zero keeps its sign (ggml writes IQ4_XS's zero
                // blocks with d = −0).
                .map(|&s| op.stored(s))
                .collect();
            let codes = v
                .iter()
                .enumerate()
                .map(|(i, &x)| match op.params(sup[i / per], 0.0) {
                    Some((s, _)) => op.code(x, s, 0.0) as i32,
                    None => 0,
                })
                .collect();
            Ok((d, codes))
        };
        let (d, sc) = ints(scale_op, &self.sup, &self.scale)?;
        let (dmin, mn) = match &self.min {
            Some((sup, min)) => ints(min_op, sup, min)?,
            None => (vec![f16::ZERO; d.len()], vec![0; sc.len()]),
        };
        let op = self.weight_op();
        let g = kind.group();
        let mut bytes = vec![0u8; rows * cols / QK_K * kind.block_bytes()];
        for (b, out) in bytes.chunks_mut(kind.block_bytes()).enumerate() {
            let codes: Vec<u8> = (b * QK_K..(b + 1) * QK_K)
                .map(|i| {
                    let mi = m.as_ref().map_or(0.0, |m| m[i / g]);
                    kind.stored(match op.params(a[i / g], mi) {
                        Some((s, mi)) => op.code(w[i], s, mi),
                        None => 0.0,
                    })
                })
                .collect();
            let scales = KScales {
                d: d[b],
                dmin: dmin[b],
                sc: sc[b * per..(b + 1) * per].to_vec(),
                mn: mn[b * per..(b + 1) * per].to_vec(),
            };
            kind.write(out, &scales, &codes);
        }
        Ok(GgmlTensor {
            dtype: kind.ggml(),
            rows,
            cols,
            bytes,
        })
    }
}

impl Quantizer {
    /// The quantizer of a linear stored as `q`, its scales initialized to the stored ones, and
    /// the variables holding them (named `qat_scale`, `qat_min`, `qat_super`, `qat_super_min`).
    fn start(
        q: &QuantizedWeight,
        device: &candle_core::Device,
    ) -> Result<(Self, Vec<(String, Var)>)> {
        let column = |f: Vec<f32>| -> Result<Var> {
            let n = f.len();
            Ok(Var::from_tensor(&Tensor::from_vec(f, (n, 1), device)?)?)
        };
        let half = |v: &[f16]| v.iter().map(|x| x.to_f32()).collect::<Vec<f32>>();
        let named = |n: &str, v: &Var| (n.to_string(), v.clone());
        Ok(match q {
            QuantizedWeight::Packed(t) => {
                let scale = column(half(&t.scales))?;
                let min = if t.scheme.grid == Grid::Asymmetric {
                    Some(column(half(&t.mins))?)
                } else {
                    None
                };
                let mut vars = vec![named("qat_scale", &scale)];
                vars.extend(min.iter().map(|m| named("qat_min", m)));
                let grid = Quantizer::Grid {
                    scheme: t.scheme,
                    scale,
                    min,
                };
                (grid, vars)
            }
            QuantizedWeight::Blocks(b) if b.dtype == GgmlType::IQ4NL => {
                let d = b
                    .bytes
                    .chunks(IQuant::IQ4NL.type_size())
                    .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32() * LEVELS_HELD)
                    .collect();
                let d = column(d)?;
                let vars = vec![named("qat_scale", &d)];
                (Quantizer::Levels(d), vars)
            }
            QuantizedWeight::Blocks(b) => match Saved::of(b.dtype) {
                Some(kind) => {
                    let k = KGrid::new(kind, &b.bytes, device)?;
                    let mut vars = vec![named("qat_super", &k.sup), named("qat_scale", &k.scale)];
                    if let Some((sup, min)) = &k.min {
                        vars.extend([named("qat_super_min", sup), named("qat_min", min)]);
                    }
                    (Quantizer::K(k), vars)
                }
                None => (Quantizer::Refit(b.dtype), vec![]),
            },
        })
    }
}

/// IQ4_NL's op: each weight the nearest of the 16 levels (over 128) times its block's scale
/// (`128·d`, rounded to fp16 as `d` is stored).
fn nl_op() -> FakeQuantOp {
    FakeQuantOp {
        lo: LEVELS_SPAN.0,
        hi: LEVELS_SPAN.1,
        group: IQuant::IQ4NL.block_size(),
        asymmetric: false,
        params: Params::Half { held: LEVELS_HELD },
        levels: true,
    }
}

/// The IQ4_NL blocks of the weight `w` under the scales `d` (`128·d`), by [`nl_op`]'s
/// arithmetic.
fn nl_export(name: &str, w: &[f32], d: &[f32], rows: usize, cols: usize) -> Result<GgmlTensor> {
    shrink_core::check_matrix(d, 1, d.len(), name)?;
    shrink_core::check_matrix(w, rows, cols, name)?;
    let (kind, op) = (IQuant::IQ4NL, nl_op());
    let mut bytes = vec![0u8; kind.row_bytes(rows * cols)];
    for ((out, w), &d) in bytes
        .chunks_mut(kind.type_size())
        .zip(w.chunks(op.group))
        .zip(d)
    {
        // A zero scale writes the level nearest zero, as ggml does.
        let index = |w: f32| {
            let x = op
                .params(d, 0.0)
                .map_or(0.0, |(s, _)| op.position(w, s, 0.0));
            nearest_level(x).0
        };
        let l: Vec<u8> = w.iter().map(|&w| index(w)).collect();
        out[..2].copy_from_slice(&op.stored(d).to_le_bytes());
        crate::iquant::write_indices(kind, out, &l);
    }
    Ok(GgmlTensor {
        dtype: GgmlType::IQ4NL,
        rows,
        cols,
        bytes,
    })
}

impl QatLinear {
    fn weight(&self) -> Result<Tensor> {
        let w = self.latent.as_tensor();
        Ok(match &self.quantizer {
            Quantizer::Grid { scheme, scale, min } => fake_quantize(
                w,
                scale.as_tensor(),
                min.as_ref().map(|m| m.as_tensor()),
                scheme,
            )?,
            Quantizer::K(k) => k.weight(w)?,
            Quantizer::Levels(d) => apply(nl_op(), w, d.as_tensor(), None)?,
            Quantizer::Refit(dtype) => {
                let values: Vec<f32> = w.flatten_all()?.to_vec1()?;
                let q =
                    GgmlTensor::quantize(&values, self.rows, self.cols, *dtype, None, &self.name)?
                        .dequantize()?;
                let q = Tensor::from_vec(q, (self.rows, self.cols), w.device())?;
                (w + (q - w)?.detach())?
            }
        })
    }

    /// The stored form of the current weight: the same codes and scales the forward pass used.
    fn export(&self) -> Result<QuantizedWeight> {
        let values: Vec<f32> = self.latent.as_tensor().flatten_all()?.to_vec1()?;
        Ok(match &self.quantizer {
            Quantizer::K(k) => {
                QuantizedWeight::Blocks(k.export(&self.name, &values, self.rows, self.cols)?)
            }
            Quantizer::Levels(d) => QuantizedWeight::Blocks(nl_export(
                &self.name,
                &values,
                &d.as_tensor().flatten_all()?.to_vec1()?,
                self.rows,
                self.cols,
            )?),
            Quantizer::Refit(dtype) => QuantizedWeight::Blocks(GgmlTensor::quantize(
                &values, self.rows, self.cols, *dtype, None, &self.name,
            )?),
            Quantizer::Grid { scheme, scale, min } => {
                let stored = |v: &Var| -> Result<Vec<f16>> {
                    Ok(v.as_tensor()
                        .flatten_all()?
                        .to_vec1::<f32>()?
                        .into_iter()
                        .map(f16::from_f32)
                        .collect())
                };
                let scales = stored(scale)?;
                let mins = match min {
                    Some(m) => stored(m)?,
                    None => vec![f16::ZERO; scales.len()],
                };
                let g = group_len(scheme, self.rows, self.cols);
                let (lo, hi) = code_range(scheme);
                let offset = match scheme.grid {
                    Grid::Asymmetric => 0.0,
                    _ => (1u32 << (scheme.bits - 1)) as f32,
                };
                let op = FakeQuantOp {
                    lo: lo as f32,
                    hi: hi as f32,
                    group: g,
                    asymmetric: min.is_some(),
                    params: Params::Stored,
                    levels: false,
                };
                // The forward pass's arithmetic, code by code.
                let codes: Vec<u8> = values
                    .iter()
                    .enumerate()
                    .map(|(i, &w)| {
                        let (s, m) = op
                            .params(scales[i / g].to_f32(), mins[i / g].to_f32())
                            .unwrap_or((1.0, 0.0));
                        (op.code(w, s, m) + offset) as u8
                    })
                    .collect();
                let params: Vec<GroupParams> = scales
                    .iter()
                    .zip(&mins)
                    .map(|(&s, &m)| GroupParams::from_stored(s, m))
                    .collect();
                QuantizedWeight::Packed(QuantizedTensor::from_parts(
                    self.rows, self.cols, *scheme, &codes, &params,
                ))
            }
        })
    }
}

/// Trains `start` (the model with its linears replaced by the dequantized values of `initial`,
/// e.g. from GPTQ) against `teacher` with fake-quantized linears, on `windows`, evaluating on
/// `eval`. Returns the model with its final quantized values, their stored form and the log.
/// With `workdir`, checkpoints go there and a rerun with the same `fingerprint` resumes.
#[allow(clippy::too_many_arguments)]
pub fn qat(
    teacher: &Transformer,
    start: &Transformer,
    initial: &QuantizedModel,
    job: &QatJob,
    windows: &[Vec<u32>],
    eval: &[Vec<u32>],
    workdir: Option<&Path>,
    fingerprint: &str,
    progress: &dyn Progress,
) -> Result<(Transformer, QuantizedModel, TrainOutcome)> {
    let (mut student, mut params) = trainable(start, &job.frozen)?;
    let mut linears = Vec::new();
    for (weight_name, q) in &initial.tensors {
        let name = weight_name.trim_end_matches(".weight").to_string();
        let latent = params
            .iter()
            .find(|(n, _)| n == weight_name)
            .map(|(_, v)| v.clone())
            .ok_or_else(|| {
                QuantError::Scheme(format!(
                    "QAT trains the quantized linears: '{weight_name}' must not be frozen"
                ))
            })?;
        let (rows, cols) = latent.as_tensor().dims2()?;
        let device = latent.device().clone();
        let (quantizer, scales) = Quantizer::start(q, &device)?;
        if job.learn_scales {
            params.extend(scales.into_iter().map(|(n, v)| (format!("{name}.{n}"), v)));
        }
        linears.push(QatLinear {
            name,
            latent,
            rows,
            cols,
            quantizer,
        });
    }
    if let Some(a) = &job.activations {
        student.set_act_quant_by(|name| a.for_linear(name));
    }
    let forward_linears = linears.clone();
    let prepare = move |model: &mut Transformer| -> shrink_train::Result<()> {
        for l in &forward_linears {
            let w = l
                .weight()
                .map_err(|e| shrink_train::TrainError::Hook(Box::new(e)))?;
            model.linear_mut(&l.name)?.set_weight(w)?;
        }
        Ok(())
    };
    let (trained, outcome) = Distiller::new(
        student,
        params,
        Teacher::Model(teacher.clone()),
        job.loss.clone(),
    )?
    .with_prepare(Box::new(prepare))
    .fit(&job.train, windows, eval, workdir, fingerprint, progress)?;
    let mut result = QuantizedModel::default();
    for l in &linears {
        let q = l.export()?;
        result.layers.push(LayerReport {
            name: l.name.clone(),
            format: match &l.quantizer {
                Quantizer::Grid { scheme, .. } => crate::Format::Scheme(*scheme).label(),
                Quantizer::K(k) => k.kind.name().to_string(),
                Quantizer::Levels(_) => IQuant::IQ4NL.name().to_string(),
                Quantizer::Refit(d) => match d.iquant() {
                    Some(q) => crate::Format::I(q).label(),
                    None => format!("{d:?}").to_lowercase(),
                },
            },
            shape: [l.rows, l.cols],
            bits_per_weight: q.bits_per_weight(),
            relative_output_error: None,
            zero_fraction: crate::zero_fraction(&q.dequantize()?),
            wall_s: 0.0,
        });
        result.tensors.insert(format!("{}.weight", l.name), q);
    }
    let mut tensors = trained.named_tensors();
    // The stored values, exactly.
    for (name, q) in &result.tensors {
        if let Some(t) = tensors.get_mut(name) {
            let (rows, cols) = t.dims2()?;
            *t = Tensor::from_vec(q.dequantize()?, (rows, cols), t.device())?;
        }
    }
    let mut model = Transformer::from_tensors(&trained.config, tensors, DType::F32)?;
    if let Some(a) = &job.activations {
        model.set_act_quant_by(|name| a.for_linear(name));
    }
    Ok((model, result, outcome))
}

mod saved;
#[cfg(test)]
mod tests;
