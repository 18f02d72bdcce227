//! Activation recomputation (per-block checkpointing) for distillation and QAT: the student runs
//! forward once without a graph, keeping only each block's input; the loss's gradient with
//! respect to the last states comes from the head, a slice of rows at a time; then each block,
//! from the last, runs forward again from its kept input with a graph and is differentiated
//! alone, `∂(out · g)` giving its parameters' gradients and the gradient `g` of its input. What is
//! held at once is one block's graph and one slice of logits instead of every block's and the
//! whole batch's, at the cost of a second forward pass of the student's blocks (the first one
//! through the inference kernels).

use super::{captured, next_tokens, Capture, Distiller, RowTargets};
use crate::loss;
use crate::trainer::Parts;
use crate::{Batch, Result, Step, TrainError};
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use shrink_core::gemm::{gemm, Operand};
use shrink_models::{F32Values, NoHook, Transformer};
use std::ops::Range;

/// Logit values held per slice of the head: rows × vocabulary ≈ this many.
pub(super) const HEAD_SLICE_VALUES: usize = 1 << 23;

/// Gradients summed per parameter over the backward passes of one micro-batch.
struct Sums<'a> {
    params: &'a [(String, Var)],
    grads: Vec<Option<Tensor>>,
}

impl<'a> Sums<'a> {
    fn new(params: &'a [(String, Var)]) -> Self {
        Self {
            params,
            grads: vec![None; params.len()],
        }
    }

    fn add(&mut self, store: &GradStore) -> Result<()> {
        for ((_, p), sum) in self.params.iter().zip(&mut self.grads) {
            if let Some(g) = store.get(p.as_tensor()) {
                *sum = Some(match sum.take() {
                    Some(s) => (s + g)?,
                    None => g.clone(),
                });
            }
        }
        Ok(())
    }
}

/// A decoder's LM head differentiated by hand, a slice of rows at a time: the logits' gradient
/// from the loss, then `∂states = ∂logits · W` and `∂W += ∂logitsᵀ · states` with shrink's
/// products (one weight-sized sum instead of one per slice).
struct Head {
    /// The head's weight as it enters the product (tied: the token embedding).
    weight: Tensor,
    vocab: usize,
    hidden: usize,
    /// `∂W` summed over the slices, when the weight is trained.
    grad: Option<Vec<f32>>,
}

impl Head {
    fn of(model: &Transformer) -> Result<Self> {
        let weight = match &model.lm_head {
            Some(head) => head.weight().clone(),
            None => model.embed_tokens.clone(),
        };
        let (vocab, hidden) = weight.dims2()?;
        let grad = weight.track_op().then(|| vec![0f32; vocab * hidden]);
        Ok(Self {
            weight,
            vocab,
            hidden,
            grad,
        })
    }

    /// The gradient of final states `states` `(rows, hidden)` given `loss`, which takes their
    /// logits `(rows × vocab)` and returns the gradient of the loss with respect to them.
    fn step(
        &mut self,
        states: &Tensor,
        loss: impl FnOnce(Vec<f32>) -> Result<Vec<f32>>,
    ) -> Result<Tensor> {
        let rows = states.dim(0)?;
        let states_f32 = states.detach().to_dtype(DType::F32)?;
        let x = F32Values::of(&states_f32)?;
        let (v, h) = (self.vocab, self.hidden);
        let mut logits = vec![0f32; rows * v];
        // Read in place (the weight's values are not copied).
        let w = F32Values::of(&self.weight)?;
        gemm(
            rows,
            v,
            h,
            Operand::row_major(&x, h),
            Operand::transposed(&w, h),
            &mut logits,
            false,
        );
        let dl = loss(logits)?;
        if let Some(grad) = self.grad.as_mut() {
            let dl_t = Operand::transposed(&dl, v);
            gemm(v, h, rows, dl_t, Operand::row_major(&x, h), grad, true);
        }
        let mut dx = vec![0f32; rows * h];
        gemm(
            rows,
            h,
            v,
            Operand::row_major(&dl, v),
            Operand::row_major(&w, h),
            &mut dx,
            false,
        );
        Ok(Tensor::from_vec(dx, (rows, h), states.device())?.to_dtype(states.dtype())?)
    }

    /// `Σ W ⊙ ∂W`, whose backward pass takes `∂W` to the parameters the weight comes from.
    fn weight_surrogate(self) -> Result<Option<Tensor>> {
        let Some(grad) = self.grad else {
            return Ok(None);
        };
        let dw = Tensor::from_vec(grad, (self.vocab, self.hidden), self.weight.device())?;
        let w = self.weight.to_dtype(DType::F32)?;
        Ok(Some((w * dw)?.sum_all()?))
    }
}

/// `a + b` where either may be missing.
fn plus(a: Option<Tensor>, b: Option<&Tensor>) -> Result<Option<Tensor>> {
    Ok(match (a, b) {
        (Some(a), Some(b)) => Some((a + b)?),
        (a, b) => a.or_else(|| b.cloned()),
    })
}

impl Distiller {
    /// A decoder's logit loss on rows `rows` of the batch from the student's `logits` for them
    /// (`rows × vocab`): its value (the rows' share, [`Distiller::logit_loss`]'s) and the gradient
    /// of `scale ×` it with respect to the logits. Against a teacher's logits in one fused pass
    /// ([`loss::logit_rows`]); cached top-k targets through the loss's graph.
    fn head_loss(
        &self,
        logits: Vec<f32>,
        rows: Range<usize>,
        ids: &Tensor,
        target: RowTargets,
        scale: f64,
        parts: &mut Parts,
    ) -> Result<(f64, Vec<f32>)> {
        let (n, device) = (rows.len(), ids.device());
        let vocab = logits.len() / n.max(1);
        let teacher = match target {
            RowTargets::Logits(t) => t.flatten_all()?.to_vec1::<f32>()?,
            other => {
                let logits = Var::from_vec(logits, (n, vocab), device)?;
                let loss = self.logit_loss(logits.as_tensor(), rows, ids, other, parts)?;
                let value = loss.to_scalar::<f32>()? as f64;
                let dl = (loss * scale)?
                    .backward()?
                    .get(logits.as_tensor())
                    .ok_or_else(|| TrainError::Config("the loss does not reach the logits".into()))?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                return Ok((value, dl));
            }
        };
        let c = &self.config;
        let (b, t) = ids.dims2()?;
        let targets = next_tokens(ids, rows)?;
        // The whole batch's means: KD over its b·t positions, CE over the b·(t − 1) with a next
        // token; (1 − α)·KD + α·CE when α > 0.
        let (kd_of, ce_of) = ((b * t) as f64, (b * (t - 1)).max(1) as f64);
        let (kd_mix, ce_mix) = match c.alpha > 0.0 {
            true => (1.0 - c.alpha, c.alpha),
            false => (1.0, 0.0),
        };
        let mut dl = vec![0f32; logits.len()];
        let sums = loss::logit_rows(
            &logits,
            &teacher,
            vocab,
            &targets,
            c.temperature,
            c.divergence,
            (scale * kd_mix / kd_of, scale * ce_mix / ce_of),
            &mut dl,
        )?;
        let (kd, ce) = (sums.kd / kd_of, sums.ce / ce_of);
        parts.add("ce", ce);
        parts.add("kd", kd);
        Ok((kd_mix * kd + ce_mix * ce, dl))
    }

    /// [`crate::Objective::gradients`] with activations recomputed block by block (see the
    /// module's documentation). The same loss and gradients as the whole graph's backward pass,
    /// up to the order of floating-point sums.
    pub(crate) fn recomputed(&mut self, batch: &Batch, scale: f64) -> Result<Step> {
        let c = self.config.clone();
        let student = self.student()?.clone();
        let ids = &batch.ids;
        let (b, t) = ids.dims2()?;
        let ctx = student.attention_context(t, 0)?;
        // The forward pass without a graph: each block's input is kept.
        let fast = student.detached();
        let mut inputs = Vec::with_capacity(fast.blocks.len());
        let mut x = fast.embed(ids)?;
        for block in &fast.blocks {
            let next = block.forward(&x, &ctx, None, &mut NoHook)?;
            inputs.push(std::mem::replace(&mut x, next));
        }
        drop(fast);
        let teacher = self.teacher_forward(ids)?;
        let t_hidden = teacher.as_ref().map(|(h, _)| h);
        let params = self.params.clone();
        let mut sums = Sums::new(&params);
        let mut parts = Parts::default();
        let mut total = 0.0;

        // The head: the loss's gradient with respect to the last states.
        let last = Var::from_tensor(&x)?;
        let mut g = None;
        if student.arch.is_encoder() {
            let loss = self.encoder_loss(&student, last.as_tensor(), t_hidden, &mut parts)?;
            total += loss.to_scalar::<f32>()? as f64;
            let store = (loss * scale)?.backward()?;
            sums.add(&store)?;
            g = plus(g, store.get(last.as_tensor()))?;
        } else {
            let mut head = Head::of(&student)?;
            let rows = b * t;
            let flat = last.as_tensor().flatten_to(1)?;
            for range in self.head_slices(rows, head.vocab) {
                let states = student.final_hidden(&flat.narrow(0, range.start, range.len())?)?;
                let target = self.row_targets(batch, range.clone(), t_hidden)?;
                let g_states = head.step(&states, |logits| {
                    let (value, dl) =
                        self.head_loss(logits, range, ids, target, scale, &mut parts)?;
                    total += value;
                    Ok(dl)
                })?;
                let store = (states * g_states)?.sum_all()?.backward()?;
                sums.add(&store)?;
                g = plus(g, store.get(last.as_tensor()))?;
            }
            if let Some(surrogate) = head.weight_surrogate()? {
                sums.add(&surrogate.backward()?)?;
            }
        }
        let mut g = g.ok_or_else(|| {
            TrainError::Config("the loss does not depend on the student's last states".into())
        })?;
        // The log lists the state losses after the logit ones, as the whole-graph loss does.
        if !c.hidden.is_empty() {
            parts.add("hidden", 0.0);
        }
        if c.attention.is_some() {
            parts.add("attention", 0.0);
        }

        // The blocks, from the last: forward again from the kept input, then backward.
        let (no_states, no_attention) = (Default::default(), Default::default());
        let (t_states, t_attention) = match &teacher {
            Some((_, capture)) => (&capture.hidden, &capture.attention),
            None => (&no_states, &no_attention),
        };
        for (i, block) in student.blocks.iter().enumerate().rev() {
            let input = Var::from_tensor(&inputs[i])?;
            let pairs: Vec<usize> = (0..c.hidden.len())
                .filter(|&n| c.hidden[n].0 == i)
                .collect();
            let attention = c.attention.filter(|p| p.0 == i);
            let mut capture = Capture::new(pairs.first().map(|_| i), attention.map(|p| p.0));
            let out = block.forward(input.as_tensor(), &ctx, None, &mut capture)?;
            let mut surrogate = (out * &g)?.sum_all()?;
            for n in pairs {
                let pair = c.hidden[n];
                let hs = captured(&capture.hidden, pair.0, "hidden", pair)?;
                let ht = captured(t_states, pair.1, "hidden", pair)?;
                let l = self.hidden_term(n, hs, ht)?;
                let value = l.to_scalar::<f32>()? as f64 / c.hidden.len() as f64;
                parts.add("hidden", value);
                total += value * c.hidden_weight;
                let w = c.hidden_weight / c.hidden.len() as f64 * scale;
                surrogate = (surrogate + (l * w)?)?;
            }
            if let Some(pair) = attention {
                let a_s = captured(&capture.attention, pair.0, "attention", pair)?;
                let a_t = captured(t_attention, pair.1, "attention", pair)?;
                let l = Self::attention_term(a_s, a_t)?;
                let value = l.to_scalar::<f32>()? as f64;
                parts.add("attention", value);
                total += value * c.attention_weight;
                surrogate = (surrogate + (l * (c.attention_weight * scale))?)?;
            }
            let store = surrogate.backward()?;
            sums.add(&store)?;
            g = store.get(input.as_tensor()).cloned().ok_or_else(|| {
                TrainError::Config(format!("block {i}'s output does not depend on its input"))
            })?;
        }

        // The embeddings, when any of them is trained.
        let embedded = student.embed(ids)?;
        if embedded.track_op() {
            sums.add(&(embedded * &g)?.sum_all()?.backward()?)?;
        }
        Ok(Step {
            loss: total,
            parts: parts.0,
            grads: sums.grads,
        })
    }
}
