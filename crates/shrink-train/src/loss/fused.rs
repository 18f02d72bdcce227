//! A decoder's logit loss against a teacher's full logits with its gradient, computed row by row
//! in one parallel pass instead of through a graph of whole-slice tensors: the same quantities as
//! [`super::kl_divergence`] and [`super::cross_entropy`] (which stay the reference, and serve the
//! whole-graph path and cached top-k targets), up to the order of float sums.

use super::Divergence;
use crate::{Result, TrainError};
use rayon::prelude::*;

/// Sums over the rows of one call of [`logit_rows`].
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RowSums {
    /// `Σ T²·KL` over the rows.
    pub kd: f64,
    /// `Σ CE` over the rows with a target.
    pub ce: f64,
}

/// For `rows` rows of student and teacher logits (`vocab` each, row-major) and each row's next
/// token (`None`: no target), the sums of `T²·KL` (forward: teacher ‖ student; reverse: student ‖
/// teacher, both at `temperature`) and of the cross-entropy (at temperature 1), and in `grad` the
/// gradient with respect to the student's logits of `kd_weight · ΣT²·KL + ce_weight · ΣCE`.
#[allow(clippy::too_many_arguments)]
pub fn logit_rows(
    student: &[f32],
    teacher: &[f32],
    vocab: usize,
    targets: &[Option<u32>],
    temperature: f64,
    divergence: Divergence,
    (kd_weight, ce_weight): (f64, f64),
    grad: &mut [f32],
) -> Result<RowSums> {
    let rows = targets.len();
    if vocab == 0
        || student.len() != rows * vocab
        || teacher.len() != student.len()
        || grad.len() != student.len()
    {
        return Err(TrainError::Shape(format!(
            "fused logit loss: {} student, {} teacher and {} gradient values for {rows} rows of {vocab}",
            student.len(),
            teacher.len(),
            grad.len()
        )));
    }
    if let Some(bad) = targets.iter().flatten().find(|&&t| t as usize >= vocab) {
        return Err(TrainError::Shape(format!(
            "target token {bad} is outside the vocabulary of {vocab}"
        )));
    }
    if !(temperature > 0.0 && temperature.is_finite()) {
        return Err(TrainError::Config(format!(
            "temperature must be positive, got {temperature}"
        )));
    }
    let sums = student
        .par_chunks(vocab)
        .zip(teacher.par_chunks(vocab))
        .zip(grad.par_chunks_mut(vocab))
        .zip(targets.par_iter())
        .map_init(
            || vec![0f32; vocab],
            |p, (((s, t), g), target)| {
                row(
                    s,
                    t,
                    *target,
                    temperature,
                    divergence,
                    (kd_weight, ce_weight),
                    g,
                    p,
                )
            },
        )
        .collect::<Vec<_>>();
    // Summed in row order: the same value on any thread count.
    Ok(sums.into_iter().fold(RowSums::default(), |a, r| RowSums {
        kd: a.kd + r.kd,
        ce: a.ce + r.ce,
    }))
}

/// `max`, then `Σ exp((x − max)·scale)` written to `out`, and `ln` of the sum.
fn exp_row(x: &[f32], scale: f32, out: &mut [f32]) -> (f32, f64) {
    let max = x
        .iter()
        .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
    let mut sum = 0f64;
    for (o, &v) in out.iter_mut().zip(x) {
        *o = ((v - max) * scale).exp();
        sum += *o as f64;
    }
    (max, sum.ln())
}

/// One row: `q` (the student's probabilities at T) is built in `g`, `p` in `p`.
#[allow(clippy::too_many_arguments)]
fn row(
    s: &[f32],
    t: &[f32],
    target: Option<u32>,
    temperature: f64,
    divergence: Divergence,
    (kd_weight, ce_weight): (f64, f64),
    g: &mut [f32],
    p: &mut [f32],
) -> RowSums {
    let inv = (1.0 / temperature) as f32;
    let (ms, ls) = exp_row(s, inv, g);
    let (mt, lt) = exp_row(t, inv, p);
    let (zs, zt) = (ls.exp(), lt.exp());
    // Log-probabilities at T: (x − max)/T − ln Z.
    let log_q = |j: usize| ((s[j] - ms) * inv) as f64 - ls;
    let log_p = |j: usize| ((t[j] - mt) * inv) as f64 - lt;
    let mut kl = 0f64;
    for j in 0..s.len() {
        let (q, pj) = (g[j] as f64 / zs, p[j] as f64 / zt);
        kl += match divergence {
            Divergence::Forward => pj * (log_p(j) - log_q(j)),
            Divergence::Reverse => q * (log_q(j) - log_p(j)),
        };
        g[j] = q as f32;
        p[j] = pj as f32;
    }
    // ∂(T²·KL)/∂s_j: forward T·(q_j − p_j); reverse T·q_j·(ln q_j − ln p_j − KL).
    for j in 0..s.len() {
        let (q, pj) = (g[j] as f64, p[j] as f64);
        let d = match divergence {
            Divergence::Forward => q - pj,
            Divergence::Reverse => q * (log_q(j) - log_p(j) - kl),
        };
        g[j] = (kd_weight * temperature * d) as f32;
    }
    // Cross-entropy at temperature 1: ln Σ exp(s) − s_target, gradient softmax(s) − onehot.
    let mut ce = 0f64;
    if let Some(target) = target {
        let (m1, l1) = if temperature == 1.0 {
            (ms, ls)
        } else {
            let mut sum = 0f64;
            for &v in s {
                sum += ((v - ms) as f64).exp();
            }
            (ms, sum.ln())
        };
        ce = l1 - (s[target as usize] - m1) as f64;
        if ce_weight != 0.0 {
            for (j, gj) in g.iter_mut().enumerate() {
                let soft = (((s[j] - m1) as f64) - l1).exp();
                let hot = if j == target as usize { 1.0 } else { 0.0 };
                *gj += (ce_weight * (soft - hot)) as f32;
            }
        }
    }
    RowSums {
        kd: temperature * temperature * kl,
        ce,
    }
}
