//! Distillation losses on logits, hidden states and attention maps. Every function returns a
//! scalar f32 tensor that is differentiable with respect to the student's inputs.
//!
//! Logit losses take the student's logits `(positions, vocab)` and a [`Target`]: the teacher's
//! full logits, or its top-k log-probabilities cached at temperature `T` (the rest of the teacher's
//! mass becomes one "tail" bucket, so both distributions stay proper over k + 1 outcomes). KL
//! losses are scaled by `T²` (Hinton et al.), which keeps their gradients comparable across
//! temperatures.

use crate::{Result, TrainError};
use candle_core::{DType, Tensor, D};

mod fused;
pub use fused::{logit_rows, RowSums};

/// Smallest probability used inside logarithms (tail buckets, attention maps with zeros).
const FLOOR: f64 = 1e-12;

/// The teacher's distribution at each position.
#[derive(Debug, Clone, Copy)]
pub enum Target<'a> {
    /// Full teacher logits `(positions, vocab)`.
    Logits(&'a Tensor),
    /// The teacher's `k` most likely tokens per position: `indices` `(positions, k)` (u32) and
    /// their log-probabilities at the loss temperature, `(positions, k)` (f32), from
    /// [`top_k_log_probs`].
    TopK {
        indices: &'a Tensor,
        log_probs: &'a Tensor,
    },
}

/// Which divergence the logit loss minimises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Divergence {
    /// KL(teacher ‖ student): mass-covering, the classic distillation loss.
    Forward,
    /// KL(student ‖ teacher): mode-seeking (MiniLLM).
    Reverse,
}

impl Divergence {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "forward" | "kl" | "forward-kl" => Ok(Self::Forward),
            "reverse" | "reverse-kl" => Ok(Self::Reverse),
            other => Err(TrainError::Config(format!(
                "unknown divergence '{other}': expected forward-kl or reverse-kl"
            ))),
        }
    }
}

/// `log_softmax(x / t)` over the last dimension.
pub fn log_softmax(x: &Tensor, temperature: f64) -> Result<Tensor> {
    let x = (x.to_dtype(DType::F32)? / temperature)?;
    let z = x.log_sum_exp(D::Minus1)?.unsqueeze(D::Minus1)?;
    Ok(x.broadcast_sub(&z)?)
}

/// Log-probabilities over k + 1 buckets (the k given ones, then the tail) from the k bucket
/// log-probabilities `(positions, k)`.
fn with_tail(log_probs: &Tensor) -> Result<Tensor> {
    let mass = log_probs.exp()?.sum_keepdim(D::Minus1)?;
    let tail = (1.0 - mass)?.clamp(FLOOR, 1.0)?.log()?;
    Ok(Tensor::cat(&[log_probs, &tail], D::Minus1)?)
}

/// Mean over positions of `Σ exp(a)·(a − b)` for log-distributions `a`, `b` `(positions, n)`.
fn kl_rows(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok((a.exp()? * (a - b)?)?.sum(D::Minus1)?.mean_all()?)
}

/// The teacher and student log-distributions a logit loss compares, at temperature `t`.
fn distributions(student: &Tensor, target: Target, t: f64) -> Result<(Tensor, Tensor)> {
    let s = log_softmax(student, t)?;
    match target {
        Target::Logits(teacher) => {
            check_same(student, teacher, "teacher logits")?;
            Ok((log_softmax(teacher, t)?, s))
        }
        Target::TopK { indices, log_probs } => {
            check_same(indices, log_probs, "top-k log-probabilities")?;
            if indices.dim(0)? != s.dim(0)? {
                return Err(TrainError::Shape(format!(
                    "top-k targets cover {} positions, the student produced {}",
                    indices.dim(0)?,
                    s.dim(0)?
                )));
            }
            let picked = s.gather(&indices.contiguous()?, D::Minus1)?;
            Ok((
                with_tail(&log_probs.to_dtype(DType::F32)?)?,
                with_tail(&picked)?,
            ))
        }
    }
}

fn check_same(a: &Tensor, b: &Tensor, what: &str) -> Result<()> {
    if a.dims() != b.dims() {
        return Err(TrainError::Shape(format!(
            "{what} are shaped {:?}, expected {:?}",
            b.dims(),
            a.dims()
        )));
    }
    Ok(())
}

/// `T² · KL(teacher ‖ student)` (forward) or `T² · KL(student ‖ teacher)` (reverse) at temperature
/// `t`, averaged over positions.
pub fn kl_divergence(
    student: &Tensor,
    target: Target,
    temperature: f64,
    divergence: Divergence,
) -> Result<Tensor> {
    if temperature.is_nan() || temperature <= 0.0 {
        return Err(TrainError::Config(format!(
            "temperature must be positive, got {temperature}"
        )));
    }
    let (p, q) = distributions(student, target, temperature)?;
    let kl = match divergence {
        Divergence::Forward => kl_rows(&p, &q)?,
        Divergence::Reverse => kl_rows(&q, &p)?,
    };
    Ok((kl * (temperature * temperature))?)
}

/// Mean cross-entropy of `logits` `(positions, vocab)` against token ids `targets` `(positions)`.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let logits = logits.to_dtype(DType::F32)?;
    let z = logits.log_sum_exp(D::Minus1)?;
    let picked = logits
        .gather(&targets.unsqueeze(1)?.contiguous()?, 1)?
        .squeeze(1)?;
    Ok((z - picked)?.mean_all()?)
}

/// Mean squared error between hidden states of equal shape.
pub fn hidden_mse(student: &Tensor, teacher: &Tensor) -> Result<Tensor> {
    check_same(teacher, student, "student hidden states")?;
    Ok((student - teacher)?.sqr()?.mean_all()?)
}

/// Mean over positions of `1 − cos(student, teacher)` along the last dimension.
pub fn hidden_cosine(student: &Tensor, teacher: &Tensor) -> Result<Tensor> {
    check_same(teacher, student, "student hidden states")?;
    let dot = (student * teacher)?.sum(D::Minus1)?;
    let ns = student.sqr()?.sum(D::Minus1)?.sqrt()?;
    let nt = teacher.sqr()?.sum(D::Minus1)?.sqrt()?;
    let cos = (dot / ((ns * nt)? + FLOOR)?)?;
    Ok((1.0 - cos)?.mean_all()?)
}

/// MiniLM's attention transfer: `KL(teacher ‖ student)` between attention distributions
/// `(batch, heads, queries, keys)`, averaged over batch, heads and queries. Masked (zero)
/// probabilities contribute nothing.
pub fn attention_kl(student: &Tensor, teacher: &Tensor) -> Result<Tensor> {
    check_same(teacher, student, "student attention maps")?;
    let lt = (teacher + FLOOR)?.log()?;
    let ls = (student + FLOOR)?.log()?;
    Ok((teacher * (lt - ls)?)?.sum(D::Minus1)?.mean_all()?)
}

/// The `k` largest log-probabilities of `softmax(logits / t)` per row with their token ids,
/// ordered by probability (ties by lower id): `(indices (rows, k) u32, log_probs (rows, k) f32)`.
pub fn top_k_log_probs(logits: &Tensor, k: usize, temperature: f64) -> Result<(Tensor, Tensor)> {
    let lp = log_softmax(logits, temperature)?;
    let (rows, vocab) = lp.dims2()?;
    if k == 0 || k > vocab {
        return Err(TrainError::Config(format!(
            "top-k must be between 1 and the vocabulary size {vocab}, got {k}"
        )));
    }
    let values = lp.to_vec2::<f32>()?;
    let mut indices = Vec::with_capacity(rows * k);
    let mut picked = Vec::with_capacity(rows * k);
    let mut order: Vec<u32> = Vec::with_capacity(vocab);
    for row in &values {
        order.clear();
        order.extend(0..vocab as u32);
        let better =
            |a: &u32, b: &u32| row[*b as usize].total_cmp(&row[*a as usize]).then(a.cmp(b));
        if k < vocab {
            order.select_nth_unstable_by(k - 1, better);
        }
        order[..k].sort_unstable_by(better);
        indices.extend_from_slice(&order[..k]);
        picked.extend(order[..k].iter().map(|&i| row[i as usize]));
    }
    let device = logits.device();
    Ok((
        Tensor::from_vec(indices, (rows, k), device)?,
        Tensor::from_vec(picked, (rows, k), device)?,
    ))
}
