//! Quantization-aware training: every block linear computes with a fake-quantized weight, and
//! the student is distilled from the unquantized model with [`shrink_train`]'s trainer.
//!
//! - Grid schemes (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and any bits × group, channel or tensor scheme):
//!   the codes are `clamp(round(w / s))` with a straight-through gradient for the rounding (zero
//!   outside the clip range, identity inside) and LSQ: the per-group scale `s` (and, on the
//!   asymmetric grid, the minimum) is a trained parameter. Scales are rounded to fp16 in the
//!   forward pass, as they are stored, so the exported codes and scales reproduce the trained
//!   model exactly.
//! - K-quants: the weight is quantized and dequantized by the k-quant quantizer at every step
//!   (its scales are fitted, not learned) with a straight-through gradient.
//!
//! The result is a [`QuantizedModel`], written through the same GGUF / compressed-tensors path
//! as post-training quantization.

use crate::grid::{Grid, GroupParams};
use crate::kquant::GgmlTensor;
use crate::tensor::{Granularity, QuantScheme, QuantizedTensor};
use crate::{LayerReport, QuantError, QuantizedModel, QuantizedWeight, Result};
use candle_core::{DType, Tensor, Var};
use half::f16;
use shrink_core::Progress;
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
    /// Learn the grid schemes' scales (LSQ); off keeps the initial scales fixed.
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
    K(shrink_io::ggml::GgmlType),
}

#[derive(Debug, Clone)]
struct QatLinear {
    name: String,
    latent: Var,
    rows: usize,
    cols: usize,
    quantizer: Quantizer,
}

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
}

impl FakeQuantOp {
    /// The fp16 scale and minimum as stored, with a scale of 0 (an all-zero group) read as 1.
    fn params(s: f32, m: f32) -> (f32, f32) {
        let s = f16::from_f32(s).to_f32();
        (if s == 0.0 { 1.0 } else { s }, f16::from_f32(m).to_f32())
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
            .for_each(|(g, (o, w))| {
                let (s, m) = Self::params(scale[g], min[g]);
                for (o, &w) in o.iter_mut().zip(w) {
                    let code = self.position(w, s, m).clamp(self.lo, self.hi).round();
                    *o = if self.asymmetric {
                        code * s + m
                    } else {
                        code * s
                    };
                }
            });
        Ok((candle_core::CpuStorage::F32(out), l1.shape().clone()))
    }

    /// Straight-through for the rounding, zero outside the clip range; LSQ for the scale
    /// (`round(x) − x` inside, the bound outside) and the minimum (0 inside, 1 outside).
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
                let (s, m) = Self::params(sv[g], mv[g]);
                let (mut gs, mut gm) = (0f32, 0f32);
                for ((gw, &w), &d) in gw.iter_mut().zip(w).zip(grad) {
                    let x = self.position(w, s, m);
                    if x < self.lo || x > self.hi {
                        gs += d * if x < self.lo { self.lo } else { self.hi };
                        gm += d;
                    } else {
                        *gw = d;
                        gs += d * (x.round() - x);
                    }
                }
                (gs, gm)
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
    let group = group_len(scheme, rows, cols);
    let groups = rows * cols / group;
    let (lo, hi) = code_range(scheme);
    let op = FakeQuantOp {
        lo: lo as f32,
        hi: hi as f32,
        group,
        asymmetric: min.is_some(),
    };
    let scale = scale.reshape((groups, 1))?.contiguous()?;
    let min = match min {
        Some(m) => m.reshape((groups, 1))?.contiguous()?,
        None => scale.zeros_like()?,
    };
    w.to_dtype(DType::F32)?
        .contiguous()?
        .apply_op3(&scale, &min, op)
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
            Quantizer::K(dtype) => {
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
            Quantizer::K(dtype) => QuantizedWeight::Blocks(GgmlTensor::quantize(
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
                };
                // The forward pass's arithmetic, code by code.
                let codes: Vec<u8> = values
                    .iter()
                    .enumerate()
                    .map(|(i, &w)| {
                        let (s, m) =
                            FakeQuantOp::params(scales[i / g].to_f32(), mins[i / g].to_f32());
                        (op.position(w, s, m).clamp(op.lo, op.hi).round() + offset) as u8
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
        let quantizer = match q {
            QuantizedWeight::Packed(t) => {
                let column = |v: &[f16]| -> Result<Var> {
                    let f: Vec<f32> = v.iter().map(|x| x.to_f32()).collect();
                    let n = f.len();
                    Ok(Var::from_tensor(&Tensor::from_vec(f, (n, 1), &device)?)?)
                };
                let scale = column(&t.scales)?;
                let min = if t.scheme.grid == Grid::Asymmetric {
                    Some(column(&t.mins)?)
                } else {
                    None
                };
                if job.learn_scales {
                    params.push((format!("{name}.qat_scale"), scale.clone()));
                    if let Some(m) = &min {
                        params.push((format!("{name}.qat_min"), m.clone()));
                    }
                }
                Quantizer::Grid {
                    scheme: t.scheme,
                    scale,
                    min,
                }
            }
            QuantizedWeight::Blocks(b) => Quantizer::K(b.dtype),
        };
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
                Quantizer::K(d) => format!("{d:?}").to_lowercase(),
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

#[cfg(test)]
mod tests;
