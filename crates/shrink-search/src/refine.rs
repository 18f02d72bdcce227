//! Verification and refinement: each allocation is quantized for real and measured; the table is
//! corrected with what the measurement showed and the allocation redone, until it repeats or the
//! rounds or the time run out. Everything tried is kept (the frontier) and the best is reported.

use crate::{allocate, Budget, Item, Result, Score};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Instant;

/// What the verified model must meet.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Goal {
    /// At most this many bytes in all (the fixed bytes included); the measured KL is minimised.
    MaxSize(u64),
    /// At most this measured perplexity increase, in percent; the size is minimised.
    MaxPplIncrease(f64),
}

/// A mix quantized for real and measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Measurement {
    /// The whole artifact's bytes.
    pub size_bytes: u64,
    pub score: Score,
    /// Per item name, the relative output error the real quantization of the whole mix gave.
    pub errors: BTreeMap<String, f64>,
}

/// One verified allocation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Tried {
    pub round: usize,
    /// Per item, the chosen option's name.
    pub choices: Vec<String>,
    /// The allocation's summed predicted KL (from the table of its round).
    pub predicted_kl: f64,
    pub size_bytes: u64,
    pub score: Score,
    pub met: bool,
}

/// When to stop refining.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// No new round starts after this instant (the first always runs).
    pub deadline: Option<Instant>,
    pub max_rounds: usize,
}

/// Quantizes an allocation for real and measures it.
pub trait Verifier {
    /// Quantizes and measures `choices` (an index into each item's options) as round `round`.
    fn measure(&mut self, round: usize, items: &[Item], choices: &[usize]) -> Result<Measurement>;
    /// Round `round` is the best so far: keep its artifact.
    fn keep(&mut self, round: usize) -> Result<()>;
    /// Whether the time budget is spent, given that this process's clock says `past_deadline`:
    /// a verifier whose work is split across ranks answers with one rank's clock on all of them,
    /// so that they stop at the same round.
    fn out_of_time(&mut self, past_deadline: bool) -> Result<bool> {
        Ok(past_deadline)
    }
}

/// Everything tried, the best of it, whether it meets the goal and why the search stopped.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SearchOutcome {
    pub goal: Goal,
    pub tried: Vec<Tried>,
    pub best: usize,
    pub met: bool,
    pub stopped: String,
}

impl Goal {
    fn met(&self, size: u64, score: &Score) -> bool {
        match *self {
            Goal::MaxSize(max) => size <= max,
            Goal::MaxPplIncrease(max) => score.ppl_increase_pct <= max,
        }
    }

    /// Whether `a` is better than `b`: meeting the goal first; then the objective (the KL under
    /// a size goal, the size under a quality goal); a miss is better the closer it comes.
    pub fn better(&self, a: &Tried, b: &Tried) -> bool {
        if a.met != b.met {
            return a.met;
        }
        let key = |t: &Tried| match (self, t.met) {
            (Goal::MaxSize(_), true) => (t.score.kl, t.size_bytes as f64),
            (Goal::MaxSize(_), false) => (t.size_bytes as f64, t.score.kl),
            (Goal::MaxPplIncrease(_), true) => (t.size_bytes as f64, t.score.kl),
            (Goal::MaxPplIncrease(_), false) => (t.score.ppl_increase_pct, t.size_bytes as f64),
        };
        let (ka, kb) = (key(a), key(b));
        ka.0.total_cmp(&kb.0).then(ka.1.total_cmp(&kb.1)).is_lt()
    }
}

/// The KL that corresponds to a perplexity increase of `pct` percent (the mean log-likelihood
/// falls by about the KL).
fn kl_of_ppl(pct: f64) -> f64 {
    (1.0 + pct.max(1e-6) / 100.0).ln()
}

/// Searches for the best mix of `items` (see the module documentation). `fixed_bytes` is what
/// the artifact holds besides the items (metadata, norms, tensors not searched).
///
/// Each round allocates on the current table (under `goal`'s size less the fixed bytes, or under
/// the KL that `goal`'s perplexity increase corresponds to) and verifies the allocation with
/// `verifier`. Then:
/// - under a size goal, every tensor's row of the table is rescaled by how far its real output
///   error (quantized in the whole mix, on the activations of the already-quantized blocks before
///   it) departs from the one its sensitivity was measured with;
/// - under a quality goal, the KL target moves by the ratio of the wanted to the measured
///   perplexity change, inside the bracket of predicted KLs already seen to pass and fail.
///
/// The search stops when an allocation repeats (a quality goal first narrows its bracket), after
/// `limits.max_rounds` verified rounds, or when the deadline has passed. The best round by
/// [`Goal::better`] is kept through [`Verifier::keep`] as soon as it is measured.
///
/// ```
/// use shrink_search::*;
/// struct Exact;
/// impl Verifier for Exact {
///     fn measure(&mut self, _: usize, items: &[Item], c: &[usize]) -> Result<Measurement> {
///         let kl: f64 = items.iter().zip(c).map(|(i, &c)| i.choices[c].loss).sum();
///         let size = 10 + items.iter().zip(c).map(|(i, &c)| i.choices[c].size_bytes).sum::<u64>();
///         let score = Score { kl, nll: 1.0 + kl, ppl_increase_pct: 100.0 * (kl.exp() - 1.0) };
///         Ok(Measurement { size_bytes: size, score, errors: Default::default() })
///     }
///     fn keep(&mut self, _: usize) -> Result<()> { Ok(()) }
/// }
/// let items = vec![
///     Item::new("a", vec![Choice::new("q8_0", 100, 0.0), Choice::new("q4_0", 50, 0.1)]),
///     Item::new("b", vec![Choice::new("q8_0", 100, 0.0), Choice::new("q4_0", 50, 0.5)]),
/// ];
/// let limits = Limits { deadline: None, max_rounds: 4 };
/// let out = refine(&items, 10, Goal::MaxSize(160), &limits, &mut Exact).unwrap();
/// assert!(out.met);
/// assert_eq!(out.tried[out.best].choices, ["q4_0", "q8_0"]);
/// ```
pub fn refine(
    items: &[Item],
    fixed_bytes: u64,
    goal: Goal,
    limits: &Limits,
    verifier: &mut dyn Verifier,
) -> Result<SearchOutcome> {
    let mut table = items.to_vec();
    let mut tried: Vec<Tried> = Vec::new();
    let mut seen: Vec<Vec<usize>> = Vec::new();
    let mut best: Option<usize> = None;
    let mut target = match goal {
        Goal::MaxSize(max) => max.saturating_sub(fixed_bytes).max(1) as f64,
        Goal::MaxPplIncrease(pct) => kl_of_ppl(pct),
    };
    // Quality goals: the largest KL target seen to pass and the smallest seen to fail.
    let (mut passed, mut failed): (Option<f64>, Option<f64>) = (None, None);
    let mut stopped = format!("the round limit ({})", limits.max_rounds.max(1));
    let mut attempts = 0;
    while tried.len() < limits.max_rounds.max(1) {
        attempts += 1;
        if !tried.is_empty()
            && verifier.out_of_time(limits.deadline.is_some_and(|d| Instant::now() >= d))?
        {
            stopped = "the time budget".into();
            break;
        }
        if attempts > limits.max_rounds.max(1).saturating_mul(4) {
            stopped = "a repeated allocation".into();
            break;
        }
        let budget = match goal {
            Goal::MaxSize(_) => Budget::MaxSize(target as u64),
            Goal::MaxPplIncrease(_) => Budget::MaxLoss(target),
        };
        let alloc = allocate(&table, budget)?;
        if let Some(i) = seen.iter().position(|c| *c == alloc.choices) {
            // A quality goal moves its target into the unexplored part of its bracket; a size
            // goal has converged.
            if let Goal::MaxPplIncrease(_) = goal {
                let hi = failed.unwrap_or(f64::INFINITY);
                let next = if tried[i].met {
                    hi.is_finite().then(|| (target * hi).sqrt())
                } else {
                    Some(passed.map_or(target * 0.8, |lo| (lo * target).sqrt()))
                };
                if let Some(next) = next.filter(|n| (n - target).abs() > 1e-6 * target) {
                    target = next;
                    continue;
                }
            }
            stopped = "a repeated allocation".into();
            break;
        }
        let round = tried.len();
        let m = verifier.measure(round, items, &alloc.choices)?;
        let met = goal.met(m.size_bytes, &m.score);
        let t = Tried {
            round,
            choices: table
                .iter()
                .zip(&alloc.choices)
                .map(|(it, &c)| it.choices[c].name.clone())
                .collect(),
            predicted_kl: alloc.loss,
            size_bytes: m.size_bytes,
            score: m.score,
            met,
        };
        if best.is_none_or(|b| goal.better(&t, &tried[b])) {
            best = Some(round);
            verifier.keep(round)?;
        }
        tried.push(t);
        seen.push(alloc.choices.clone());
        // Under a size goal, the table's errors are corrected by the real ones, tensor by tensor
        // (a quality goal corrects its KL target instead: doing both would correct twice).
        let correct = matches!(goal, Goal::MaxSize(_));
        for (item, &c) in table.iter_mut().zip(&alloc.choices).filter(|_| correct) {
            let (Some(predicted), Some(&real)) = (item.choices[c].error, m.errors.get(&item.name))
            else {
                continue;
            };
            if predicted > 0.0 && real > 0.0 && real.is_finite() {
                let f = (real / predicted).clamp(0.25, 4.0);
                for ch in &mut item.choices {
                    ch.loss *= f;
                    ch.error = ch.error.map(|e| e * f);
                }
            }
        }
        match goal {
            Goal::MaxSize(max) => {
                // Only if the fixed bytes were misjudged: take the excess off the next budget.
                if m.size_bytes > max {
                    target = (target - (m.size_bytes - max) as f64).max(1.0);
                }
            }
            Goal::MaxPplIncrease(pct) => {
                // The bracket holds predicted KLs: passing mixes at or below `passed`, failing
                // ones at or above `failed`.
                if met {
                    passed = Some(passed.map_or(alloc.loss, |p: f64| p.max(alloc.loss)));
                } else {
                    failed = Some(failed.map_or(alloc.loss, |f: f64| f.min(alloc.loss)));
                }
                // One step moves the target at most 4× either way (a measured improvement, a
                // negative increase, would otherwise send it to the smallest mix at once).
                let measured = kl_of_ppl(m.score.ppl_increase_pct);
                let mut next = target * (kl_of_ppl(pct) / measured).clamp(0.25, 4.0);
                let (lo, hi) = (passed.unwrap_or(0.0), failed.unwrap_or(f64::INFINITY));
                if !(next > lo && next < hi) {
                    next = match (passed, failed) {
                        (Some(p), Some(f)) => (p * f).sqrt(),
                        (None, Some(f)) => f * 0.8,
                        (Some(p), None) => p * 1.25,
                        (None, None) => next,
                    };
                }
                target = next;
            }
        }
    }
    let best = best.unwrap_or(0);
    Ok(SearchOutcome {
        goal,
        met: tried.get(best).is_some_and(|t| t.met),
        tried,
        best,
        stopped,
    })
}
